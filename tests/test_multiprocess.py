"""Two JAX processes (jax.distributed on 127.0.0.1, 4 CPU devices each) train like one process.

The 2-process run reads its data split per process (each process half of every global batch);
its losses must equal a 1-process run on 8 devices with the same global batches, and its
checkpoint must restore and resume in a 1-process run (Orbax reshards, the data position is
translated to the new process count).
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

import subproc
from stable_alignment_jax.checkpoints import run_dir as checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multiprocess
ARGS = ["--config=configs/stage1.py:tiny", "--config.train.steps=4", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.checkpoint.save_every=2",
        "--config.checkpoint.async_save=False", "--config.train.tensorboard=False"]


def _main(run_dir, env):
  return subprocess.Popen([sys.executable, "-m", "stable_alignment_jax.main", *ARGS,
                           f"--config.checkpoint.dir={run_dir}"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs, timeout=600):
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    outs.append(out)
  return outs


def _losses(run_dir) -> dict[int, float]:
  """step -> loss; a resumed run appends, so the last line of a step wins."""
  out = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if rec["split"] == "train":
        out[rec["step"]] = rec["loss"]
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("mp")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  two = [_main(tmp / "two", subproc.jax_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
         for i in range(2)]
  _finish(two)
  one_out, = _finish([_main(tmp / "one", subproc.jax_env(8))])
  return tmp, one_out


def test_two_processes_give_the_losses_of_one(runs):
  tmp, _ = runs
  one, two = _losses(tmp / "one"), _losses(tmp / "two")
  assert sorted(one) == sorted(two) == [1, 2, 3, 4]
  np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)],
                             rtol=1e-5, atol=1e-5)
  assert one[4] < one[1]  # and something was learned, so equal losses are not two constants


def test_two_process_checkpoint_restores_in_one_process(runs):
  tmp, _ = runs
  _, p_two = checkpoints.load_model(str(tmp / "two"))
  _, p_one = checkpoints.load_model(str(tmp / "one"))
  import jax
  assert len(jax.devices()) == 8 and jax.process_count() == 1
  for a, b in zip(jax.tree.leaves(p_two), jax.tree.leaves(p_one)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_two_process_run_resumes_in_one_process(runs):
  tmp, _ = runs
  resumed = tmp / "resumed"
  shutil.copytree(tmp / "two", resumed)
  shutil.rmtree(resumed / "4")  # as if killed after the step-2 checkpoint
  out, = _finish([_main(resumed, subproc.jax_env(8))])
  assert f"resumed {resumed} at step 2" in out, out[-2000:]
  one, again = _losses(tmp / "one"), _losses(resumed)
  # Steps 3 and 4 run in one process from the 2-process state and data position.
  np.testing.assert_allclose([again[3], again[4]], [one[3], one[4]], rtol=1e-5, atol=1e-5)
