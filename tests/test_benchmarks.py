"""The benchmarks' shared hygiene (benchmarks/common.py) and `benchmarks/device.py --dry`, the
script for the day a chip is lent, run on CPU so it cannot rot."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402


def test_alternate_flips_the_order_each_round():
  order = []
  times = common.alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 4)
  assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
  assert [len(v) for v in times.values()] == [4, 4]
  assert common.stats([3.0, 1.0, 2.0, 10.0]) == {"min": 1.0, "median": 2.5, "n": 4}


def test_sanity_flags_a_baseline_far_from_its_own_parts():
  assert common.sanity("hf", 1.5, 1.0)[0]
  ok, text = common.sanity("hf", 3.0, 1.0)
  assert not ok and "SUSPECT" in text and "3.00x" in text


@pytest.mark.parametrize("before, busy, flagged", [
    (0.2, 0.3, False),  # quiet: others used 0.3 cores
    (1.6, 0.0, True),  # loaded as it started
    (0.2, 1.5, True),  # others took 1.5 cores while it ran
])
def test_run_flags_contamination_and_writes_json(tmp_path, monkeypatch, capsys, before, busy,
                                                 flagged):
  # The load average after counts the run's own threads: high, yet not a flag by itself.
  loads = iter([(before,) * 3, (1.9,) * 3])
  monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
  clock = iter([100.0, 102.0])  # 2 s of wall
  monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
  cpu = iter([50.0, 50.0 + 2 * busy + 3.0])  # the machine's busy seconds: others + ours
  monkeypatch.setattr(common, "busy_s", lambda: next(cpu))
  own = iter([10.0, 13.0])  # this process: 3 CPU seconds
  monkeypatch.setattr(common, "own_s", lambda: next(own))
  path = tmp_path / "r.json"
  with common.Run("t", str(path)) as run:
    run.row("figure", "1.0 s")
  out = capsys.readouterr().out
  assert ("CONTAMINATED" in out) == flagged and "figure  1.0 s" in out
  data = json.loads(path.read_text())
  assert data["contaminated"] == flagged and data["peak_load"] == 1.9
  assert data["others_cores"] == pytest.approx(busy)
  assert data["rows"] == {"figure": "1.0 s"}


def test_device_dry_runs_every_section(tmp_path):
  path = tmp_path / "device.json"
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "device.py"), "--dry",
                      f"--json={path}"], capture_output=True, text=True, timeout=240, cwd=ROOT)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  d = json.loads(path.read_text())
  t = d["train"]
  assert t["tokens"] == 2 * 2 * 64 and len(t["times"]) == 2
  assert t["tokens_per_s"] == pytest.approx(t["tokens"] / min(t["times"]))
  assert 0 < t["loss"] < 20
  assert d["plan"]["step_s"] > 0 and d["plan"]["measured_s"] == min(t["times"])
  assert set(d["decode"]["1"]) == {"8", "128"}
  assert set(d["sampler"]) >= {"1", "4"} and d["sampler"]["4"]["tokens"] == 4 * 8
  for b in ("1", "4"):
    assert len(d["sampler"][b]["times"]["ours"]) == 2
  for key in ("(a) train tokens/s", "(d) planner step s", "(c) decode ms/step b=1",
              "(b) tokens/s b=4", "wall s"):
    assert key in d["rows"], key
  assert "[device] after:" in r.stdout
