"""The pipeline's wiring: step order, stage chaining, skip-finished, resume after a failure.

The parts themselves are tested in their own files; here they are replaced by recorders so the
orchestration can be checked in seconds. The real tiny pipeline end to end is `slow`.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import pipeline as pipeline_config
from stable_alignment_jax.recipes import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _card(n=4):
  split = lambda k: {"train": {"examples": n}, "validation": {"examples": k}}
  return {"datasets": {"imitation": {"splits": split(1)}, "self_critic": {"splits": split(1)},
                       "realignment": {"splits": split(0)}}}


class Recorder:
  """Stands in for the parts; records what each was given; can fail once at a named step."""

  def __init__(self, fail_at=None):
    self.calls, self.fail_at = [], fail_at

  def install(self, monkeypatch, p):
    def step(name, result):
      def fn(*args):
        self.calls.append((name, args))
        if self.fail_at == name:
          self.fail_at = None
          raise RuntimeError(f"{name} killed")
        return result(*args) if callable(result) else result
      return fn
    monkeypatch.setattr(p, "make_world", step("world", {"corpus": "c", "tokenizer": "sp.model",
                                                        "questions": "q", "priors": "p"}))
    monkeypatch.setattr(p, "society_lm", step("society_lm", {"dir": p.path("society_lm")}))
    monkeypatch.setattr(p, "sandbox", step("sandbox", {"export": "e.jsonl"}))
    monkeypatch.setattr(p, "data", step("data", _card()))
    monkeypatch.setattr(p, "rlhf", step("ppo", {"dir": p.path("ppo", "policy")}))
    monkeypatch.setattr(p, "evaluate", step("eval", {}))
    monkeypatch.setattr(p, "report", step("report", {"table": "t.md"}))

    def train(cfg):
      name = os.path.basename(cfg.checkpoint.dir)
      self.calls.append((name, (cfg,)))
      if self.fail_at == name:
        self.fail_at = None
        raise RuntimeError(f"{name} killed")
      return {"dir": cfg.checkpoint.dir, "origin": cfg.checkpoint.init_from}
    monkeypatch.setattr(pipeline, "train_stage", train)


def _config(tmp_path):
  c = pipeline_config.get_config("tiny")
  c.out_dir = str(tmp_path / "out")
  return c


def test_steps_run_in_order_and_stages_chain(tmp_path, monkeypatch):
  p = pipeline.Pipeline(_config(tmp_path))
  rec = Recorder()
  rec.install(monkeypatch, p)
  out = p.run()
  names = [n for n, _ in rec.calls]
  assert names == ["world", "society_lm", "sandbox", "data", "stage1", "stage2", "stage3",
                   "mixed", "sft", "ppo", "eval", "report"]
  cfgs = {n: a[0] for n, a in rec.calls if n.startswith(("stage", "sft", "mixed"))}
  # Each stage starts from the previous one; Stage 1 and the baseline from the society LM.
  assert cfgs["stage1"].checkpoint.init_from == p.path("society_lm")
  assert cfgs["stage2"].checkpoint.init_from == p.path("stage1")
  assert cfgs["stage3"].checkpoint.init_from == p.path("stage2")
  assert cfgs["sft"].checkpoint.init_from == p.path("society_lm")
  assert cfgs["mixed"].checkpoint.init_from == p.path("society_lm")
  kinds = {n: c.data.dataset for n, c in cfgs.items()}
  assert kinds == {"stage1": "sandbox_alignment/imitation", "stage2": "sandbox_alignment/self_critic",
                   "stage3": "sandbox_alignment/realignment", "sft": "sandbox_alignment/imitation",
                   "mixed": "sandbox_alignment/imitation"}
  # The staged recipe replays the earlier kinds; the mixed run reads all three at 5:1:1.
  mix = lambda n: {k: v.weight for k, v in cfgs[n].data.mixture.items()}
  assert mix("stage1") == {"imitation": 1.0}
  assert mix("stage2") == {"self_critic": 0.75, "imitation": 0.25}
  assert mix("stage3") == {"realignment": 0.75, "imitation": 0.125, "self_critic": 0.125}
  assert mix("mixed") == {"imitation": 5.0, "self_critic": 1.0, "realignment": 1.0}
  ppo_args = dict(rec.calls)["ppo"]
  assert ppo_args[1] == p.path("society_lm") and ppo_args[2] == "sp.model" 
  assert all(c.data.tokenizer == "sp.model" and c.data.data_dir == p.path("data")
             for c in cfgs.values())
  assert cfgs["stage3"].train.eval_every == 0  # the card says: no realignment validation data
  evaluated = dict(rec.calls)["eval"][0]
  assert list(evaluated) == ["start", "stage1", "stage2", "stage3", "mixed", "sft", "ppo"]
  assert set(out["seconds"]) == set(names)


def test_rerun_skips_finished_steps_and_resumes_after_a_failure(tmp_path, monkeypatch):
  c = _config(tmp_path)
  p = pipeline.Pipeline(c)
  rec = Recorder(fail_at="stage2")
  rec.install(monkeypatch, p)
  with pytest.raises(RuntimeError, match="stage2 killed"):
    p.run()
  state = json.loads((tmp_path / "out" / pipeline.STATE).read_text())["steps"]
  assert list(state) == ["world", "society_lm", "sandbox", "data", "stage1"]  # not stage2
  again = pipeline.Pipeline(c)
  rec2 = Recorder()
  rec2.install(monkeypatch, again)
  again.run()
  assert [n for n, _ in rec2.calls] == ["stage2", "stage3", "mixed", "sft", "ppo", "eval",
                                        "report"]
  assert again.run()["systems"]["stage3"] == again.path("stage3")  # a third run does nothing
  assert len(rec2.calls) == 7


def test_no_training_data_for_a_stage_is_a_clear_error(tmp_path, monkeypatch):
  p = pipeline.Pipeline(_config(tmp_path))
  rec = Recorder()
  rec.install(monkeypatch, p)
  empty = _card()
  empty["datasets"]["realignment"]["splits"]["train"]["examples"] = 0
  monkeypatch.setattr(p, "data", lambda export: empty)
  with pytest.raises(ValueError, match="stage3: the SANDBOX export gave no realignment training"):
    p.run()


def test_a_replayed_kind_the_export_left_empty_is_dropped_from_the_mixture(tmp_path, monkeypatch):
  p = pipeline.Pipeline(_config(tmp_path))
  rec = Recorder()
  rec.install(monkeypatch, p)
  card = _card()
  card["datasets"]["self_critic"]["splits"]["train"]["examples"] = 0
  p.c.skip_empty_stages = True
  monkeypatch.setattr(p, "data", lambda export: card)
  p.run()
  cfgs = {n: a[0] for n, a in rec.calls if n.startswith(("stage", "mixed"))}
  assert "stage2" not in cfgs  # no self-critic data: the stage is skipped, stage3 from stage1
  assert cfgs["stage3"].checkpoint.init_from == p.path("stage1")
  assert set(cfgs["stage3"].data.mixture) == {"realignment", "imitation"}
  assert set(cfgs["mixed"].data.mixture) == {"realignment", "imitation"}


def test_paper_config_describes_the_paper_run():
  c = pipeline_config.get_config()
  assert not c.world.enabled and c.sandbox.world.n_agents == 100
  assert c.sandbox.backends.server.kind == "openai"
  assert c.stages.stage3.model.preset == "llama2_7b" and c.stages.stage3.loss.name == "sa_cpo"
  assert set(c.baselines) == {"mixed", "sft", "dpo", "rrhf", "coh"}
  assert c.rlhf.enabled and c.rlhf.ppo.ppo.rollout_batch == 512
  assert "hh" in c.eval.tasks


def test_paper_run_checks_base_model_and_judge_before_any_step(tmp_path, monkeypatch):
  c = pipeline_config.get_config()
  c.out_dir = str(tmp_path / "paper")
  p = pipeline.Pipeline(c)
  rec = Recorder()
  rec.install(monkeypatch, p)
  with pytest.raises(ValueError, match="base_model is required"):
    p.run()
  c.base_model = str(tmp_path / "hh_sft")
  monkeypatch.delenv("OPENAI_API_KEY", raising=False)
  with pytest.raises(ValueError, match="judge needs config.judge.base_url"):
    pipeline.Pipeline(c).run()
  c.eval.judge.base_url, c.eval.judge.model = "http://127.0.0.1:9/v1", "judge"
  with pytest.raises(ValueError, match="OPENAI_API_KEY"):
    pipeline.Pipeline(c).run()
  assert rec.calls == [] and not (tmp_path / "paper" / pipeline.STATE).exists()


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
  """The README's first command (minus the install): every step, a table and plots."""
  out = subprocess.run([sys.executable, "-m", "stable_alignment_jax.recipes.pipeline",
                        "--config=configs/pipeline.py:tiny", f"--config.out_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=3600)
  assert out.returncode == 0, out.stderr[-3000:]
  for f in ("report/results.md", "report/bars.png", "report/sandbox_rounds.png",
            "report/training_loss.png"):
    assert (tmp_path / f).exists(), f
  assert "Tiny world MC" in (tmp_path / "report" / "results.md").read_text()
