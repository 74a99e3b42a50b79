"""The training scaffold every method shares: the data-position translation, the frozen tree's
seam, `main` running any method's config, and a SIGKILL at a random step resuming bitwise for
every method: a preference stage, the reward model and PPO, and LoRA runs (QLoRA DPO, LoRA
PPO)."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stable_alignment_jax.training import scaffold

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_iterator_state_is_translated_to_a_new_process_count():
  saved = {"iterator": {"next_index": 30}, "process_count": 4}
  # 4 processes read 30 examples each: 120 in all, i.e. 60 each for 2.
  assert scaffold.iterator_state(saved, 2) == {"next_index": 60}
  assert scaffold.iterator_state(saved, 4) == {"next_index": 30}
  # A checkpoint that did not say its count is taken as this one's.
  assert scaffold.iterator_state({"iterator": {"next_index": 7}}, 3) == {"next_index": 7}
  with pytest.raises(ValueError, match="cannot translate"):
    scaffold.iterator_state({"iterator": {"next_index": 1, "epoch": 2}, "process_count": 2}, 1)


def test_optimizer_step_trains_params_and_passes_the_frozen_tree_untouched():
  # loss = sum((w - frozen)^2): the frozen tree reaches the loss; plain SGD lr 0.1 moves w by
  # -0.2 (w - frozen), and accumulation over two halves of a batch is the same update.
  state = {"params": {"w": jnp.array([1.0, 2.0])}, "frozen": {"w": jnp.array([0.5, 0.5])},
           "step": jnp.int32(3)}
  tx = optax.sgd(0.1)
  state["opt_state"] = tx.init(state["params"])

  def loss_fn(params, frozen, batch):
    loss = jnp.sum((params["w"] - frozen["w"]) ** 2) * jnp.mean(batch["x"])
    return loss, {"x_mean": jnp.mean(batch["x"])}

  batch = {"x": jnp.ones((4,))}
  one, m1 = scaffold.train_step(state, batch, loss_fn=loss_fn, tx=tx)
  two, m2 = scaffold.train_step(state, batch, loss_fn=loss_fn, tx=tx, accum_steps=2)
  np.testing.assert_allclose(one["params"]["w"], [1.0 - 0.1, 2.0 - 0.3], rtol=1e-6)
  np.testing.assert_allclose(two["params"]["w"], one["params"]["w"], rtol=1e-6)
  np.testing.assert_array_equal(one["frozen"]["w"], [0.5, 0.5])
  assert int(one["step"]) == 4 and float(m1["loss"]) == pytest.approx(0.25 + 2.25)
  assert float(m1["grad_norm"]) == pytest.approx(float(np.hypot(1.0, 3.0)), rel=1e-6)
  # optimizer_step alone leaves the count to the caller (a PPO iteration is many updates).
  assert int(scaffold.optimizer_step(state, batch, loss_fn=loss_fn, tx=tx)[0]["step"]) == 3


def _main(args):
  env = dict(__import__("os").environ, PYTHONPATH=str(ROOT))
  return subprocess.Popen([sys.executable, "-m", "stable_alignment_jax.main", *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_main_refuses_an_unknown_method_in_one_line(tmp_path):
  p = _main(["--config=configs/stage1.py:tiny", "--config.method=sft_loss",
             f"--config.checkpoint.dir={tmp_path / 'x'}"])
  out = p.communicate()[0]
  assert p.returncode != 0
  assert "config.method='sft_loss' is not a training method" in out
  assert "Traceback" not in out and not (tmp_path / "x").exists()


def _train_records(run_dir) -> dict[int, dict]:
  out = {}
  with open(pathlib.Path(run_dir) / "metrics.jsonl") as f:
    for line in f:
      rec = json.loads(line)
      if rec["split"] == "train":
        out[rec["step"]] = rec  # a resumed run re-logs the steps after its checkpoint
  return out


def _kill_resume(tmp_path, config, steps, extra, keys):
  """The run killed once its second checkpoint (step 4) is complete (all are kept, so a fast
  run cannot delete it before it is seen), resumed from its latest; a reference run
  uninterrupted: every step after step 4 logs the same values, bit for bit."""
  args = lambda d: [f"--config={config}", f"--config.checkpoint.dir={d}",
                    f"--config.train.steps={steps}", "--config.train.log_every=1",
                    "--config.checkpoint.save_every=2", "--config.checkpoint.keep=1000",
                    "--config.train.tensorboard=False",
                    *extra]
  killed = tmp_path / "killed"
  proc = _main(args(killed))
  deadline = time.time() + 900  # a cold compile on a loaded 2-core machine takes minutes
  while not (killed / "4").is_dir():  # a checkpoint is complete once renamed
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, "no second checkpoint in time"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  ref = _main(args(tmp_path / "ref"))
  resumed = _main(args(killed))
  out = resumed.communicate()[0]
  assert resumed.returncode == 0, out
  assert "resumed" in out
  assert ref.wait() == 0, ref.stdout.read()
  want, got = _train_records(tmp_path / "ref"), _train_records(killed)
  assert sorted(got) == list(range(1, steps + 1))
  for s in range(5, steps + 1):
    assert {k: got[s][k] for k in keys} == {k: want[s][k] for k in keys}, s


def test_stage_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
  # Bitwise on CPU: same data order restored, same compiled program, same params and moments.
  _kill_resume(tmp_path, "configs/stage1.py:tiny", 80, ["--config.train.eval_every=0"],
               ("loss", "accuracy", "grad_norm"))


@pytest.mark.slow  # 179 s on 2 cores with a cold compile cache (its eval programs too)
def test_reward_model_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
  _kill_resume(tmp_path, "configs/reward.py:tiny", 200, ["--config.train.eval_every=0"],
               ("loss", "accuracy", "margin", "grad_norm"))


def test_ppo_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
  _kill_resume(tmp_path, "configs/ppo.py:tiny", 16, [],
               ("loss", "score", "kl", "kl_coef", "rollout_crc"))


@pytest.mark.slow  # three runs with cold compiles: minutes on 2 cores
def test_qlora_dpo_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
  # LoRA on an nf4 base with DPO's adapters-off reference: the run directory holds the adapters
  # (params) and their moments, never the base (no `frozen` item); resume rebuilds the base from
  # init_from (here the seeded random init) and continues bit for bit.
  _kill_resume(tmp_path, "configs/dpo.py:tiny", 12,
               ["--config.train.eval_every=0", "--config.lora.rank=8",
                "--config.lora.quantize=nf4"], ("loss", "accuracy", "grad_norm"))
  step = tmp_path / "killed" / "4"
  assert (step / "params").is_dir() and not (step / "frozen").exists()
  run = json.loads((tmp_path / "killed" / "run_config.json").read_text())
  assert run["lora"]["rank"] == 8 and run["lora"]["quantize"] == "nf4"


@pytest.mark.slow  # three runs with cold compiles: minutes on 2 cores
def test_lora_ppo_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
  _kill_resume(tmp_path, "configs/ppo.py:tiny", 8, ["--config.lora.rank=8"],
               ("loss", "score", "kl", "kl_coef", "rollout_crc"))
  assert not (tmp_path / "killed" / "4" / "frozen").exists()
