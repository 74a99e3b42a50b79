"""What a training run reports: TensorBoard scalars and `metrics.jsonl` on process 0."""

import json
import os

import jax
import numpy as np

from stable_alignment_jax.training import flops
from stable_alignment_jax.model.presets import ModelConfig


def real_tokens(batch) -> int:
  """Tokens of a [B, K, T] batch that are text, not padding: per valid response row (response_mask
  > 0), positions 0 .. its last loss token, i.e. [BOS] + prompt + response (+ EOS); rows are
  right-padded, so everything after is padding. Empty response slots (they repeat the prompt,
  fully masked) count 0. Read from the masks, not from `pad_id`, which may also be a real token."""
  mask = np.asarray(batch["loss_mask"]) > 0
  t = mask.shape[-1]
  length = np.where(mask.any(-1), t - np.argmax(mask[..., ::-1], axis=-1), 0)  # last 1, plus 1
  return int(np.sum(length * (np.asarray(batch["response_mask"]) > 0)))


class Logger:
  """Process 0 logs: TensorBoard scalars and `metrics.jsonl` (one line per logged step; a resumed
  run appends) with loss, metrics, lr, norms, tokens/s and an MFU estimate.

  `tokens_per_s` counts every position of the padded [B, K, T] batch: the work the chips did,
  which is what MFU is measured on. `real_tokens_per_s` counts only the text (`real_tokens`),
  the throughput a run actually gets through its data; `padding_share` is the rest's share of
  the positions (the last logged batch's, like both rates). All three are in `summary["final"]`
  too, so the trainer's closing line shows them. With a shared prefix of P tokens each example
  runs P + K*(T-P) positions through the model, not K*T: MFU counts those."""

  def __init__(self, ckpt_dir: str, cfg: ModelConfig, mesh, *, tensorboard: bool,
               reference: bool = False, peak_flops_per_device: float = 0.0,
               shared_prefix: int = 0):
    """reference: the step also runs a frozen reference forward (counted in MFU);
    peak_flops_per_device: 0 = the chip table's peak for this device kind;
    shared_prefix: the step's (`train.shared_prefix_for`)."""
    self.writer = self.jsonl = None
    if jax.process_index() == 0:
      self.jsonl = open(os.path.join(ckpt_dir, "metrics.jsonl"), "a")
      if tensorboard:
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(os.path.join(ckpt_dir, "tensorboard"))
    peak = peak_flops_per_device or flops.peak_flops(jax.devices()[0].device_kind)
    self.peak_total = peak * mesh.size
    self.cfg, self.ref, self.shared_prefix = cfg, reference, shared_prefix

  def train(self, step, metrics, local_batch, seconds):
    """`seconds`: mean wall time per step since the last log."""
    tokens = local_batch["tokens"].size * jax.process_count()
    real = real_tokens(local_batch) * jax.process_count()  # this process's share, scaled up
    metrics["tokens_per_s"] = tokens / max(seconds, 1e-9)
    metrics["real_tokens_per_s"] = real / max(seconds, 1e-9)
    metrics["padding_share"] = 1.0 - real / max(tokens, 1)
    b, k, t = local_batch["tokens"].shape
    computed = flops.positions_run(b, k, t, self.shared_prefix) * jax.process_count()
    model_flops, _ = flops.step_flops(self.cfg, computed, t,
                                      reference=self.ref)  # model FLOPs, as the planner counts
    if self.peak_total:
      metrics["mfu"] = model_flops / max(seconds, 1e-9) / self.peak_total
    self.write("train", step, metrics)

  def eval(self, step, metrics):
    self.write("eval", step, metrics)
    if jax.process_index() == 0:
      shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
      print(f"[eval step {step}] {shown}", flush=True)

  def write(self, prefix, step, metrics):
    """One record of `prefix` ("train", "eval") keyed `step`, every method alike."""
    if self.writer:
      for k, v in metrics.items():
        self.writer.add_scalar(f"{prefix}/{k}", v, step)
    if self.jsonl:
      self.jsonl.write(json.dumps({"split": prefix, "step": step, **metrics}) + "\n")
      self.jsonl.flush()

  def close(self):
    for f in (self.writer, self.jsonl):
      if f:
        f.close()


def plot_training_loss(systems: dict[str, str], path: str) -> None:
  """Training loss per step of every run (name -> run directory), from its metrics.jsonl;
  runs without one are left out."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, run_dir in systems.items():
    log = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(log):
      continue
    points = {}
    with open(log) as f:
      for line in f:
        rec = json.loads(line)
        if rec["split"] == "train":
          points[rec["step"]] = rec["loss"]
    steps = sorted(points)
    ax.plot(steps, [points[s] for s in steps], marker=".", label=name)
  ax.set(xlabel="step", ylabel="training loss", title="training loss per system")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
