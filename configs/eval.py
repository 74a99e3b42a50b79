"""Evaluation config: which systems, which benchmarks, where the data and the judge are.

  python -m eval.run --config=configs/eval.py:tiny
  python -m eval.run --config=configs/eval.py:checkpoint=runs/stage3,name=stage3,limit=100
  python -m eval.table runs/eval --out=runs/eval/table

Keys (evaluate(config) in eval/run.py reads them):
  methods         name -> checkpoint spec ("random:<preset>[:seed]", HF LLaMA dir, run dir)
  checkpoint/name one more system from the command line (added to methods when set)
  tokenizer       '' = the run's data.tokenizer / the HF dir / "byte" for random models
  tasks           comma list of truthfulqa_mc1, ethics, moral_stories, mic, hh, hh_adv,
                  answer_format, answer_format_sampled, and the names of extra_tasks
  extra_tasks     name -> {items: "package.module:function" returning the MC items, column:
                  its results-table label}: benchmarks from outside eval (an experiment's world)
  data_dir        the benchmark files: $STABLE_ALIGNMENT_DATA, else ~/.cache/stable_alignment_jax/
                  data (eval/items.py); fetch=True (default) downloads a missing file that has
                  a direct URL on first use, and says what is missing and how to get it offline
  mic_path        the official MIC.csv (data-use agreement, not downloadable)
  limit           first N items per task (0 = all); results under out_dir/<name>/
  judge.*         OpenAI-compatible judge for hh/hh_adv (key from the env var api_key_env)
  answer_format.* the answer-format tasks (does the system answer held-out questions, or
                  critique / list feedback / echo the prompt; eval/answer_format.py): their
                  question source, the SANDBOX question file left out of it, sizes, sampling
  pairwise        "x:y,..." judge system x's answers against y's, both orders
  served          name -> {base_url, model, api_key_env[, concurrency, timeout_s,
                  retry_budget_s]}: systems behind an OpenAI-compatible endpoint (vLLM,
                  llama.cpp, OpenAI, our serve.py; eval/served.py). HH / HH-A / answer format
                  from their chat replies; MC tasks only where the endpoint returns prompt
                  logprobs (completions echo), else skipped with the reason in summary.json
"""

import os

import ml_collections

from configs import common
from eval import items


def get_config(arg=None):
  a = common.parse_arg(arg, tiny=False, checkpoint="", name="", limit=0, out_dir="", tasks="",
                       served="")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.methods = ml_collections.ConfigDict()
  c.checkpoint = a.checkpoint
  c.name = a.name or "model"
  c.tokenizer = ""
  c.dtype = ""  # '' = the checkpoint's compute dtype
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  c.tasks = ("hh,hh_adv,moral_stories,mic,ethics,truthfulqa_mc1,answer_format,"
             "answer_format_sampled")
  c.extra_tasks = ml_collections.ConfigDict()
  c.ethics_splits = ("test", "test_hard")
  c.moral_stories_protocol = "choose"  # choose | classify (see eval/moral_stories.py)
  c.advbench = True  # HH-A also holds AdvBench behaviours in jailbreak templates
  # paper: the misaligned reply after the question in one instruction (the paper's HH-A);
  # revise: + the realignment request, the very prompt Stage 3 trains on; input_block: the
  # project's earlier form (eval/hh.py)
  c.hh_adv_layout = "paper"
  c.data_dir = items.default_data_dir()
  c.mic_path = os.path.join(c.data_dir, "mic", "MIC.csv")
  c.fetch = True
  c.skip_missing = False  # True: a task whose file is missing is skipped (and listed) not fatal
  c.limit = a.limit
  c.out_dir = a.out_dir or "runs/eval"
  c.progress = True
  c.pairwise = ""
  c.served = ml_collections.ConfigDict()  # e.g. {"chatgpt": dict(base_url=..., model=...)}
  for name in filter(None, a.served.split("+")):  # served=chatgpt+vllm: keys to fill from flags
    c.served[name] = ml_collections.ConfigDict(dict(
        base_url="", model="", api_key_env="OPENAI_API_KEY", concurrency=8, timeout_s=120.0,
        retry_budget_s=300.0))

  c.mc = ml_collections.ConfigDict()
  c.mc.batch_size = 32  # rows (question x choice) per forward pass, rounded to the data axes
  c.mc.max_len = 0  # 0 = the model context
  c.mc.chunk = 256  # questions between result writes

  c.gen = ml_collections.ConfigDict()
  c.gen.max_new_tokens = 256
  c.gen.temperature = 0.0  # greedy, so a re-run reproduces the answers
  c.gen.top_p = 1.0
  c.gen.batch_size = 16

  c.answer_format = ml_collections.ConfigDict()
  # "hh": the HH-RLHF test dialogues' first questions (eval/hh.py), the paper's held-out
  # questions; or "module:function" returning question strings (an experiment's world).
  c.answer_format.questions = "hh"
  # Questions in this file are left out: SANDBOX's pool (HH-RLHF questions; 356 of the 4,384
  # HH test questions are in it), which every stage trained on. '' = none.
  c.answer_format.exclude_file = os.path.join(c.data_dir, "sandbox_questions", "hh_questions.txt")
  c.answer_format.n = 256  # the first n questions left (0 = all); `limit` applies too
  # auto = the layout the checkpoint was trained in (its run's data.prompt_format): Alpaca, or
  # the checkpoint's own chat template; or alpaca | chat_template.
  c.answer_format.prompt_format = "auto"
  # Enough to get past a restated feedback list to the revision (realignment layout).
  c.answer_format.max_new_tokens = 256
  c.answer_format.temperature = 0.7  # answer_format_sampled; per-item seeds, as gen does
  c.answer_format.top_p = 1.0
  c.answer_format.batch_size = 16

  c.judge = ml_collections.ConfigDict()
  c.judge.base_url = ""  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
  c.judge.model = ""  # e.g. gpt-4
  c.judge.api_key_env = "OPENAI_API_KEY"
  c.judge.cache = os.path.join(c.out_dir, "judge_cache.sqlite")
  c.judge.concurrency = 8
  c.judge.max_retries = -1  # -1: retried for retry_budget_s of failure (below), not a count
  c.judge.backoff_s = 0.5
  c.judge.timeout_s = 60.0
  c.judge.max_tokens = 256
  c.judge.temperature = 0.0
  # auto: the rating read as a verified choice (the judge's next-token scores of 1..10 after its
  # own reason) where the server continues a final assistant message, else the strict text
  # reading; text: always text. tokenizer: the judge's HF tokenizer (optional), to read choices
  # through the completions API where the chat API cannot be verified.
  c.judge.rating_mode = "auto"
  c.judge.tokenizer = ""
  c.judge.retry_budget_s = 300.0

  if a.tiny:  # a random tiny model on every local multiple-choice benchmark, in a few minutes
    c.methods = ml_collections.ConfigDict({"tiny_random": "random:tiny:0"})
    c.tokenizer = "byte"
    c.tasks = a.tasks.replace("+", ",") or "moral_stories,ethics,truthfulqa_mc1"
    c.ethics_splits = ("test",)
    c.limit = a.limit or 20
    c.out_dir = a.out_dir or "runs/eval_tiny"
    c.judge.cache = os.path.join(c.out_dir, "judge_cache.sqlite")
    c.gen.max_new_tokens = 32
    c.mc.batch_size = 64
  elif a.tasks:
    c.tasks = a.tasks.replace("+", ",")  # tasks=hh+ethics on the command line
  return c
