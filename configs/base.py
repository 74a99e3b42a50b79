"""Base configuration: every key of DESIGN.md, at paper scale (LLaMA-7B, Stable Alignment §4).

Stage files import this and override a few keys. Run a stage:
  python -m stable_alignment_jax.main --config=configs/stage1.py
"""

import ml_collections

from configs import common


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  # LLaMA-7B, bf16 compute with f32 master weights; "dots" remat keeps matmul outputs and
  # recomputes the cheap elementwise work, which fits 7B at T=360 per chip on v5p.
  c.model = common.model_block("llama2_7b", dtype="bfloat16", param_dtype="float32", remat="dots")

  # Pure FSDP over every chip: 7B params + Adam moments (~112 GB in f32) spread over the pod.
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds"  # tfds | jsonl ({data_dir}/{split}.jsonl) | trl | synthetic (embedded)
  # TFDS name/config written by data_prep; for source trl, a file (.jsonl, .json, .parquet;
  # {split} in the name is the split) or a hub dataset id in TRL's standard formats
  # (preference_files.py)
  c.data.dataset = "sandbox_alignment/imitation"
  c.data.bad_rows = "skip"  # trl: skip | raise on a malformed row (skipped ones are logged)
  c.data.data_dir = "~/tensorflow_datasets"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.tokenizer = "meta-llama/Llama-2-7b-hf"  # a .model file, an HF dir, or "byte"
  c.data.batch_size = 32  # prompts per optimizer step, global (each with K responses)
  c.data.max_len = 360  # paper: sequences truncated to 360 tokens
  c.data.num_responses = 3  # K, paper: 3 rated responses per prompt
  c.data.worker_count = 0  # grain worker processes (0 = in the training process)
  c.data.synthetic_examples = 0  # size of the embedded data set when source == synthetic
  c.data.chain_of_hindsight = False  # rewrite examples as CoH feedback text before tokenising
  # auto: the checkpoint's chat template when its tokenizer has one (a chat model is trained on
  # the format it is served with), else the paper's Alpaca layout | alpaca | chat_template
  c.data.prompt_format = "auto"
  # A response that does not fit max_len whole is left out of its group ("drop"; an example
  # left with none is dropped), or cut short and marked ("cut"): data_lengths.py.
  c.data.truncation = "drop"
  # A run stops before its first step when max_len would lose more than 5% of a kind's
  # examples or responses; True trains on what is left, knowingly.
  c.data.accept_length_loss = False
  # A weighted mixture of datasets: name -> {weight, dataset, split, source, data_dir, kind}
  # (missing keys from c.data; kind = the name). Empty: c.data.dataset alone. The epoch is
  # counted on the entry that is c.data.dataset (configs.common.replay_mixture).
  c.data.mixture = ml_collections.ConfigDict()

  # What this config trains; each method has its own block: preference -> c.loss (train.py),
  # reward -> the reward model's data and head (reward.py), ppo -> c.ppo and c.reward (ppo.py).
  # `python -m stable_alignment_jax.main` runs any of them.
  c.method = "preference"
  c.loss = ml_collections.ConfigDict()
  c.loss.name = "sa_cpo"  # sa_cpo | sft | rrhf | dpo | ipo | simpo | orpo
  c.loss.ratio = 0.2  # lambda: weight of the contrastive term (paper)
  c.loss.margin = 10.0  # mu: rating-difference margin (paper)
  c.loss.rating_scale = 7.0  # S: ratings are 1..7
  c.loss.aggregate = "mean"  # mean | max over the worse responses
  c.loss.hinge = "per_pair"  # per_pair (paper) | after_aggregate (authors' release)
  c.loss.sft_responses = "best"  # sft: best | all
  c.loss.beta = 0.1  # dpo temperature; ipo's tau, simpo's beta, orpo's lambda (TRL's `beta`)
  c.loss.label_smoothing = 0.0  # dpo / simpo: > 0 = conservative (label flipped w.p. this)
  c.loss.simpo_gamma = 0.5  # simpo: the target reward margin gamma (TRL's default)
  c.loss.rank_weight = 1.0  # rrhf ranking-term weight
  # The loss per data kind; kinds not listed take loss.name. The paper trains the self-critic
  # data with SFT (the critiques are targets to imitate, not alternatives to rank), so it stays
  # SFT also when it is replayed into Stage 3.
  c.loss.by_kind = ml_collections.ConfigDict({"self_critic": "sft"})

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-5  # paper
  c.optim.warmup_ratio = 0.03  # linear warmup, then cosine to min_lr_ratio * lr (Alpaca recipe)
  c.optim.min_lr_ratio = 0.0
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip = 1.0  # global-norm clipping
  # Micro-batches per step (gradient accumulation inside the step); 0: the fewest whose
  # activations fit the devices' memory (the CPU's cache on CPU), see budget.py.
  c.optim.accum_steps = 0

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 7.0  # paper: 7 epochs on each stage's data
  c.train.steps = -1  # > 0 overrides epochs
  c.train.log_every = 10
  c.train.eval_every = 200  # 0 = no periodic eval
  c.train.eval_batches = 20
  c.train.peak_flops_per_device = 0.0  # for MFU; 0 = look the device kind up
  c.train.tensorboard = True
  # Positions per chunk of the LM head + log-softmax (losses.chunked_sequence_logprobs); 0 = the
  # whole [B*K, T, V] f32 logits at once. With LLaMA-3's 128k vocabulary those are 185 MB per
  # 360-token row, and about as much again for their gradient: the largest tensor of a step.
  # Chunks of 64 hold 64/360 of that at a time (a 360-token row splits into 6 chunks of 60, none
  # padded), and each chunk's head matmul still covers 60 x the rows of a device, enough tokens
  # to stay compute-bound. The tiny configs keep it on, so every CPU run tests the paper's path.
  c.train.logprob_chunk = 64
  # Prompt tokens run through the layers once per example, not once per response: the K rows of
  # an example are packed as [prompt | K response tails] (train.response_logprobs); the values
  # are those of the K separate rows. -1 = the data's shortest prompt; 0 = off; P = P tokens.
  c.train.shared_prefix = -1

  # LoRA (model/lora.py): rank 0 = full fine-tuning. With rank > 0 the base (checkpoint.init_from)
  # is frozen, only the adapters (and a reward/value head) train, the reference of DPO/PPO/KL is
  # the base with adapters off, and the run directory holds the adapters alone.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0  # delta W = (alpha / rank) * A @ B (PEFT's scaling)
  c.lora.dropout = 0.0
  c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  c.lora.quantize = ""  # "" | int8 | nf4: the frozen base stored so (QLoRA), computed in dtype
  c.lora.quant_block = 64  # values per absmax scale of the quantized base

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.dir = "runs/stage"
  c.checkpoint.init_from = ""  # previous stage's checkpoint dir, or an HF LLaMA dir ("" = random)
  c.checkpoint.save_every = 500
  c.checkpoint.keep = 2
  c.checkpoint.async_save = True
  return c


def tiny(c: ml_collections.ConfigDict, name: str, steps: int = 40) -> ml_collections.ConfigDict:
  """Shrinks a stage config to run on a laptop CPU in about a minute (embedded data)."""
  c.model = common.model_block("tiny", vocab_size=384, dtype="float32", remat="none",
                               max_seq_len=256)
  c.mesh.fsdp = -1
  c.data.source = "synthetic"
  c.data.tokenizer = "byte"
  c.data.synthetic_examples = 256
  c.data.mixture = ml_collections.ConfigDict()  # the embedded set is one source
  c.data.batch_size = 8
  c.data.max_len = 160
  c.optim.lr = 3e-3
  c.optim.warmup_ratio = 0.1
  c.train.steps = steps
  c.train.log_every = 5
  c.train.eval_every = 20
  c.train.eval_batches = 2
  c.checkpoint.dir = f"runs/{name}_tiny"
  c.checkpoint.save_every = 20
  return c
