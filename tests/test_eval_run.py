"""`eval.run` end to end on random tiny models: MC tasks, HH/HH-A answered by our model and
rated by a local judge over HTTP, resume after a kill, a judge that is down, pairwise, and
`eval.table` rebuilding the table and plots from the saved results."""

import csv
import json
import os
import socket
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_eval_judge import JudgeServer, judge_score  # noqa: E402
from test_eval_loaders import MIC_HEADER, MIC_ROWS  # noqa: E402

from configs import eval as eval_config  # noqa: E402
from eval import results, run, table  # noqa: E402

N = 4  # items per task
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(shared_data, out, url, tasks, **kw):
  cfg = eval_config.get_config(f"tiny,out_dir={out}")
  cfg.methods = {"sys_a": "random:tiny:0", "sys_b": "random:tiny:1"}
  cfg.tasks, cfg.limit, cfg.data_dir, cfg.progress = tasks, N, str(shared_data), False
  cfg.gen.max_new_tokens, cfg.gen.batch_size = 8, 8
  cfg.mc.max_len = 128  # short rows: the test is about plumbing, not the model
  cfg.judge.update(base_url=url, model="test-judge", api_key_env="EVAL_TEST_JUDGE_KEY",
                   cache=str(out / "judge.sqlite"), max_retries=1, backoff_s=0.01)
  cfg.update(kw)
  return cfg


def _dead_url():
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  return f"http://127.0.0.1:{port}/v1"


def _memoized_loads(monkeypatch):
  """Random models are a pure function of their spec: build each once per test (an init
  compiles for ~20 s on a busy 2-core machine), so the test times eval, not model creation."""
  from stable_alignment_jax.checkpoints import run_dir as checkpoints
  real, memo = checkpoints.load_model, {}

  def load(spec, **kw):
    key = (spec, kw.get("dtype"), tuple(kw["mesh"].shape.items()) if kw.get("mesh") else None)
    if key not in memo:
      memo[key] = real(spec, **kw)
    return memo[key]
  monkeypatch.setattr(checkpoints, "load_model", load)


def test_evaluate_resume_judge_down_pairwise_and_table(shared_data, tmp_path, monkeypatch):
  monkeypatch.setenv("EVAL_TEST_JUDGE_KEY", "none")
  _memoized_loads(monkeypatch)
  out = tmp_path / "results"
  mic_csv = tmp_path / "MIC.csv"
  with open(mic_csv, "w", newline="") as f:
    csv.writer(f).writerows([MIC_HEADER] + MIC_ROWS)
  tasks = "truthfulqa_mc1,mic,hh,hh_adv"

  # 1) the judge is down: answers are generated and kept, the error names the endpoint
  dead = _dead_url()
  with pytest.raises(Exception, match=dead.replace(".", r"\.")):
    run.evaluate(_config(shared_data, out, dead, tasks, mic_path=str(mic_csv)))
  sys_a = results.SystemResults(str(out / "sys_a"))
  kept = sys_a.records("hh")
  assert len(kept) == N and {r["kind"] for r in kept} == {"answer"}
  assert sys_a.finished("truthfulqa_mc1", N) and sys_a.finished("mic", N)
  assert not sys_a.finished("hh", N)

  loads = []
  real_get = run._Model.get
  monkeypatch.setattr(run._Model, "get", lambda self: loads.append(self.spec) or real_get(self))
  with JudgeServer() as server:
    cfg = _config(shared_data, out, server.url, tasks, mic_path=str(mic_csv),
                  pairwise="sys_a:sys_b")
    # 2) the same run against a live judge: sys_a only needs its hh ratings (+ hh_adv)
    got = run.evaluate(cfg)
    hh_recs = sys_a.records("hh")
    assert sum(r["kind"] == "answer" for r in hh_recs) == N  # not regenerated
    ratings = {r["id"]: r["rating"] for r in hh_recs if r["kind"] == "rating"}
    answers = {r["id"]: r["answer"] for r in hh_recs if r["kind"] == "answer"}
    assert ratings == {i: judge_score(a) for i, a in answers.items()}
    a = got["sys_a"]
    assert a["ratings"]["hh"]["rated"] == N and a["ratings"]["hh_adv"]["n"] == N
    assert a["tasks"]["mic"]["n"] == 3 and a["tasks"]["truthfulqa_mc1"]["n"] == N
    assert set(a["columns"]) == {"HH", "HH-A", "MIC", "TruthfulQA MC1"}
    assert abs(a["columns"]["HH"]["value"] - sum(ratings.values()) / N) < 1e-9
    assert got["_pairwise"]["sys_a:sys_b"]["hh"]["judged"] == N
    with open(out / "pairwise" / "sys_a_vs_sys_b.json") as f:
      assert json.load(f)["hh_adv"]["n"] == N
    requests = server.stats["requests"]

    # 3) a finished run re-runs for free: no model load, no judge call, same numbers
    loads.clear()
    again = run.evaluate(cfg)
    assert loads == [] and server.stats["requests"] == requests
    assert again["sys_a"]["columns"] == a["columns"]

    # 4) a kill mid-task: half the records, a torn last line, no task summary
    path = out / "sys_b" / "truthfulqa_mc1.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    os.remove(out / "sys_b" / "truthfulqa_mc1.json")
    before = got["sys_b"]["tasks"]["truthfulqa_mc1"]
    resumed = run.evaluate(cfg)
    assert loads == ["random:tiny:1"]
    recs = [json.loads(x) for x in path.read_text().splitlines()]  # the torn line is gone
    assert sorted(r["id"] for r in recs) == [f"tqa{i}" for i in range(N)]
    after = resumed["sys_b"]["tasks"]["truthfulqa_mc1"]
    assert after["acc"] == before["acc"] and after["acc_norm"] == before["acc_norm"]
    with open(out / "sys_b" / "truthfulqa_mc1.json") as f:
      assert json.load(f)["items_scored_this_run"] == N - 2

  # 5) the table and plots from the saved results (library call and CLI)
  md = table.make_table([str(out)], str(tmp_path / "table"))
  assert "| sys_a |" in md and "| sys_b |" in md
  row = next(x for x in md.splitlines() if x.startswith("| sys_a |"))
  assert f"{a['columns']['HH']['value']:.2f} ± " in row and row.count("–") == 2
  for name in ("results.md", "results.json", "bars.png", "hh_scores.png"):
    assert (tmp_path / "table" / name).stat().st_size > 100
  ref = tmp_path / "ref.json"
  ref.write_text(json.dumps({"Paper SA": {"HH": [8.4, 0.2], "ETHICS": 0.6}}))
  proc = subprocess.run([sys.executable, "-m", "eval.table", f"renamed={out / 'sys_a'}",
                         f"--out={tmp_path / 't2'}", f"--reference={ref}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "| renamed |" in proc.stdout and "| Paper SA (reference) | 8.40 ± 0.20 |" in proc.stdout
  with open(tmp_path / "t2" / "results.json") as f:
    assert json.load(f)["rows"]["renamed"]["HH"]["n"] == N


ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
BASE = [sys.executable, "-m", "eval.run"]


@pytest.mark.slow  # a fresh process: JAX start-up, model init and compiles (~1 min here)
def test_cli_runs_tiny(shared_data, tmp_path):
  env, base = ENV, BASE
  proc = subprocess.run(base + [f"--config=configs/eval.py:tiny,limit=4,out_dir={tmp_path}/r,"
                                "tasks=truthfulqa_mc1", f"--config.data_dir={shared_data}",
                                "--config.progress=False", "--config.mc.max_len=128"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "[tiny_random] {'TruthfulQA MC1':" in proc.stdout
  with open(tmp_path / "r" / "tiny_random" / "truthfulqa_mc1.json") as f:
    info = json.load(f)
  assert info["n"] == 4 and info["seconds_per_100"] > 0


def test_cli_reports_a_missing_file_before_any_compute(tmp_path):
  env, base = ENV, BASE
  proc = subprocess.run(base + [f"--config=configs/eval.py:tiny,out_dir={tmp_path}/r2",
                                f"--config.data_dir={tmp_path}/nowhere"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
  assert proc.returncode == 1
  assert f"benchmark file missing: {tmp_path}/nowhere/moral_stories/" in proc.stderr
  assert "demelin/moral_stories" in proc.stderr
