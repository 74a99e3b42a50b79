"""SmolLM2-135M-Instruct on human preferences (HH-RLHF): SFT, DPO and SA-CPO at equal budget.

  python -m stable_alignment_jax.recipes.pipeline --config=experiments/hh_smollm2/config.py
  (resumable)

Steps (each in the pipeline's ledger, so a killed run resumes where it stopped): the start model
(the GGUF in ../shared/models dequantized to an HF directory), the split of the HH-RLHF
dialogues by first question, the learning-rate probe, then per data-order seed SFT, DPO and
SA-CPO from the start, each followed by its evaluation; the start is evaluated first; the report
is rewritten into `docs_dir` at the end. Every method trains with the same steps, batch,
max_len, schedule, seed and examples (one loader, one permutation per seed).
`arg`: `toy` (random tiny LLaMA, hand-made pairs given by `hh_dir`: the test),
`steps=N`, `seeds=N`, `lr=X` (skips the probe), `out=DIR`, `docs=DIR`, `hh_dir=DIR`,
`data_dir=DIR` (benchmark files), `n_bench=N` (0: no benchmarks).
"""

import os

import ml_collections

from configs import base, common

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(HERE))), "shared")


def get_config(arg=None):
  a = common.parse_arg(arg, toy=False, steps=12, seeds=3, lr=0.0, out="", docs="", hh_dir="",
                       data_dir="", n_bench=200)
  c = ml_collections.ConfigDict()
  c.pipeline_class = "experiments.hh_smollm2.experiment:HhPipeline"
  c.out_dir = a.out or os.path.join(HERE, "runs", "main")
  c.docs_dir = a.docs or os.path.join(HERE, "docs")
  c.seed = 0
  c.world = ml_collections.ConfigDict({"enabled": False})
  c.base_model = ""  # the pipeline's field; the start is c.start / c.gguf here
  # The start: an HF dir or run dir spec; "" = dequantize c.gguf into {out}/start_hf.
  c.start = ""
  c.gguf = os.path.join(SHARED, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
  data_dir = a.data_dir or os.environ.get("STABLE_ALIGNMENT_DATA") or os.path.join(SHARED,
                                                                                    "data")
  c.hh_dir = a.hh_dir or os.path.join(data_dir, "hh_rlhf")
  c.data_dir = data_dir  # benchmark files (eval's layout)

  # The split: a fifth of the first questions held out. Scored: n_pairs held-out pairs whose
  # prompt and both replies fit eval_max_len (the first in hash order, a fixed pseudo-random
  # draw); answer format on the first n_questions distinct held-out questions.
  c.held_out = 0.2
  c.n_pairs = 100
  c.eval_max_len = 160
  c.n_bench = a.n_bench  # items of each benchmark (ETHICS: n/5 of each subset)
  c.bench_seed = 0
  # Benchmarks on the start and the first `bench_seeds` seeds of each method (200 items x 3
  # benchmarks cost more than the held-out pairs; the pair metrics get every seed).
  c.bench_seeds = 1
  c.n_questions = 32
  c.max_new_tokens = 64
  c.gen_batch = 16
  c.batch_tokens = 2048  # packed positions per scoring forward

  c.methods = ["sft", "dpo", "sa_cpo"]
  c.seeds = list(range(a.seeds))
  c.sft_seeds = 1  # SFT on the first seed(s) only: the budget (DPO and SA-CPO get every seed)
  # The learning rate: the probe's candidates, each an SFT run of probe_steps on the train split
  # at constant lr (seed probe_seed, not one of the experiment's, so every candidate sees the
  # same batches); the lowest mean train loss over the second half of its steps (batches the
  # model has not seen yet) wins, for every method. lr > 0 skips the probe. The steps are
  # what the time budget allows (see the report's cost section).
  c.lr = a.lr
  c.probe_lrs = [1e-5, 3e-5, 1e-4]
  c.probe_steps = 8
  c.probe_seed = 100

  t = base.get_config()
  t.model.dtype, t.model.param_dtype, t.model.remat = "float32", "float32", "none"
  t.mesh.fsdp = -1
  t.data.source = "jsonl"
  t.data.train_split, t.data.eval_split = "train", "validation"
  t.data.tokenizer = ""  # the start's own (tokenizer and chat template), set by the driver
  t.data.prompt_format = "auto"  # SmolLM2's ChatML template
  t.data.num_responses = 2
  t.data.batch_size = 4
  t.data.max_len = 128
  t.data.mixture = ml_collections.ConfigDict()
  t.loss.by_kind = ml_collections.ConfigDict()
  t.loss.beta = 0.1  # DPO; reference = the start (checkpoint.init_from)
  # SA-CPO as the paper writes it: ratio 0.2, margin 10, ratings on a 7-point scale. HH rates
  # chosen 1 and rejected 0, so the hinge margin is 10/7 nats per token.
  t.loss.ratio, t.loss.margin, t.loss.rating_scale = 0.2, 10.0, 7.0
  t.loss.sft_responses = "best"
  t.optim.warmup_ratio = 0.1
  t.optim.min_lr_ratio = 0.0
  t.train.steps = a.steps
  t.train.eval_every = 0
  t.train.log_every = 1
  t.train.tensorboard = False
  t.checkpoint.save_every = a.steps
  t.checkpoint.keep = 1
  c.train = t

  if a.toy:
    toy(c)
  return c


def toy(c: ml_collections.ConfigDict) -> None:
  """A random 2-layer LLaMA over bytes on a handful of pairs: the driver end to end in seconds."""
  c.start = "random:tiny"
  c.n_pairs, c.eval_max_len, c.n_questions = 4, 256, 2
  c.n_bench = min(c.n_bench, 4)
  c.max_new_tokens, c.gen_batch, c.batch_tokens = 4, 2, 4096
  c.held_out = 0.5
  c.probe_lrs = [1e-3, 3e-3]
  c.probe_steps = 2
  t = c.train
  t.data.batch_size, t.data.max_len = 4, 256
  t.train.steps = t.checkpoint.save_every = 2
