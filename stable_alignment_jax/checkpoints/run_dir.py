"""Orbax checkpoints of a training run, and loading a model from any checkpoint kind.

A run directory (`config.checkpoint.dir`) holds an Orbax `CheckpointManager` (one numbered
directory per saved step, items `params`, `opt_state`, `step`, `data_iter`, `config`) and a
`run_config.json` written at start. Trees are stored as flat `{"a/b/c": array}` dicts keyed by
their pytree paths, so restore needs no NNX classes and resharding to a different mesh (or a
different process count) is Orbax's job: every array restores straight into its target sharding.

`load_model(spec)` gives (graphdef, state) for the sandbox, serving and eval:
  "random:<preset>[:seed]"  a freshly initialised preset (tests, smoke runs)
  <HF directory>            config.json + *.safetensors (through model/convert.py)
  <run directory>           the latest step's params of one of our runs; of a LoRA run
                            (lora.rank > 0 in its run_config.json: its params are the adapters
                            alone) the base its checkpoint.init_from names, adapters merged in
Its compute dtype is `compute_dtype`'s choice, logged on stderr as one line per load.

Every checkpoint the project writes is a run directory: training runs, and HF models imported
with `python -m stable_alignment_jax.convert` (`save_model`: `run_config.json` with the model
and tokenizer, step 0 with the one item `params`). `export_hf` writes any run directory back out
as an HF directory (a LoRA run merged), `export_peft` a LoRA run's adapters in PEFT's format.
"""

import dataclasses
import functools
import json
import math
import os
import sys
from typing import Any

import jax
from absl import logging as absl_logging
import orbax.checkpoint as ocp
from flax import nnx

from stable_alignment_jax.model import sharding
from stable_alignment_jax.model import llama
from stable_alignment_jax.model.presets import ModelConfig, preset

RUN_CONFIG = "run_config.json"


def flatten(tree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in leaves}


def unflatten(like, flat: dict[str, Any]):
  """Rebuilds `like`'s structure from a flat dict; names missing or extra keys on mismatch."""
  want = flatten(like)
  missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
  if missing or extra:
    raise KeyError(f"checkpoint tree mismatch: missing {missing[:10]}, unexpected {extra[:10]}")
  treedef = jax.tree_util.tree_structure(like)
  return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in want])


def abstract_like(tree, shardings) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat restore targets: shape, dtype and the sharding each array must land in."""
  flat, flat_sh = flatten(tree), flatten(shardings)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=flat_sh[k]) for k, v in flat.items()}


def manager(directory: str, *, keep: int = 2, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
  # Read-only managers get the settings Orbax would force (and warn about) set up front.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, enable_async_checkpointing=async_save,
      read_only=read_only, create=not read_only, save_interval_steps=0 if read_only else 1)
  path = os.path.abspath(os.path.expanduser(directory))
  if not read_only:
    return ocp.CheckpointManager(path, options=options)
  quiet = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # "Given directory is read only" on every load
  try:
    return ocp.CheckpointManager(path, options=options)
  finally:
    absl_logging.set_verbosity(quiet)


def read_run_config(directory: str) -> dict:
  path = os.path.join(os.path.expanduser(directory), RUN_CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory}: not a run directory (no {RUN_CONFIG})")
  with open(path) as f:
    return json.load(f)


def is_hf_dir(path: str) -> bool:
  cfg = os.path.join(os.path.expanduser(path), "config.json")
  if not os.path.exists(cfg):
    return False
  with open(cfg) as f:
    data = json.load(f)
  return "model_type" in data or "architectures" in data


def restore_params(directory: str, abstract_params, param_shardings, step: int | None = None):
  """The `params` item of a run directory (latest step unless given), into the given shardings."""
  with manager(directory, read_only=True) as mgr:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory}: run directory has no saved step")
    target = abstract_like(abstract_params, param_shardings)
    restored = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  return unflatten(abstract_params, dict(restored["params"])), step


def save_train_state(mgr: ocp.CheckpointManager, step: int, state: dict, *, data_iter: dict,
                     config: dict, extra: dict | None = None) -> None:
  """One training step: the trees of `state` (params, opt_state, frozen when present; flat),
  the data iterator's state, the run config, and `extra` JSON items of a trainer's own."""
  trees = {k: ocp.args.StandardSave(flatten(state[k]))
           for k in ("params", "opt_state", "frozen") if k in state}
  json_items = {k: ocp.args.JsonSave(v) for k, v in (extra or {}).items()}
  mgr.save(step, args=ocp.args.Composite(**trees, **json_items,
                                         data_iter=ocp.args.JsonSave(data_iter),
                                         config=ocp.args.JsonSave(config)), force=True)


def restore_train_state(mgr: ocp.CheckpointManager, step: int, abstract: dict, shardings: dict,
                        extra: tuple[str, ...] = ()) -> tuple[dict, dict]:
  """The trees `abstract` names ({item: abstract tree}) restored straight into `shardings`, and
  the JSON items: `data_iter` and those named in `extra`."""
  args = {k: ocp.args.StandardRestore(abstract_like(v, shardings[k])) for k, v in abstract.items()}
  json_items = {k: ocp.args.JsonRestore() for k in ("data_iter",) + tuple(extra)}
  restored = mgr.restore(step, args=ocp.args.Composite(**args, **json_items))
  return ({k: unflatten(abstract[k], dict(restored[k])) for k in abstract},
          {k: restored[k] for k in json_items})


_HF_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.model",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "generation_config.json", "chat_template.jinja", "chat_template.json"]


def resolve(spec: str) -> str:
  """A local path for a checkpoint spec: `random:...` and local paths as they are; a Hugging
  Face hub id (`org/name`, not a local path) is downloaded once into the hub cache (safetensors
  and tokenizer files only; gated repos need $HF_TOKEN) and its snapshot directory returned."""
  path = os.path.expanduser(spec)
  if (spec.startswith("random:") or os.path.exists(path) or spec.count("/") != 1
      or spec.startswith((".", "/", "~"))):
    return path if not spec.startswith("random:") else spec
  return _from_hub(spec)


@functools.lru_cache(maxsize=None)
def _from_hub(spec: str) -> str:
  """One download (or cache check) per hub id and process: check_config, the config fill and
  the weight load all resolve the same init_from."""
  from huggingface_hub import snapshot_download
  try:
    return snapshot_download(spec, allow_patterns=_HF_FILES)
  except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
    raise FileNotFoundError(f"checkpoint {spec!r}: not a local directory, and the Hugging Face "
                            f"hub could not provide it ({type(e).__name__}: {e})") from None


def compute_dtype(checkpoint: str | None, requested: str | None = None,
                  platform: str | None = None) -> str:
  """The compute dtype a loaded model runs in: the caller's when given; on CPU float32 (bf16
  matmuls there are emulated, slower and less exact); on GPU/TPU the checkpoint's own dtype
  (bfloat16 when it names none)."""
  return _dtype_and_reason(checkpoint, requested, platform)[0]


def _dtype_and_reason(checkpoint, requested, platform):
  platform = platform or jax.default_backend()
  if requested:
    return requested, "requested"
  if platform == "cpu":
    return "float32", "cpu"
  return checkpoint or "bfloat16", platform


def _log_dtype(spec: str, checkpoint: str | None, requested: str | None) -> str:
  dtype, why = _dtype_and_reason(checkpoint, requested, None)
  print(f"model {spec}: compute dtype {dtype} ({why}; checkpoint says {checkpoint or 'nothing'})",
        file=sys.stderr, flush=True)
  return dtype


def _abstract_model(cfg: ModelConfig, seed: int = 0):
  return nnx.split(nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(seed))))


def load_model(spec: str, *, dtype: str | None = None, mesh=None):
  """(graphdef, state) for a spec of the module docstring; `dtype` overrides the compute dtype
  (default: `compute_dtype`'s choice, printed on stderr)."""
  mesh = mesh or sharding.make_mesh({"fsdp": -1})
  if spec.startswith("random:"):
    _, name, *seed = spec.split(":")
    dtype = _log_dtype(spec, preset(name).dtype, dtype)
    cfg = preset(name, dtype=dtype)
    seed = int(seed[0]) if seed else 0
    return sharding.build_sharded(lambda: llama.Llama(cfg, rngs=nnx.Rngs(seed)), mesh)
  path = resolve(spec)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model checkpoint not found: {spec} (expected random:<preset>, an "
                            "HF checkpoint directory or hub id, or a run directory)")
  if is_hf_dir(path):
    from stable_alignment_jax.model import convert  # only HF users pay for its imports
    config_json, _ = convert.read_hf_json(path)
    dtype = _log_dtype(spec, convert.checkpoint_dtype(config_json), dtype)
    return load_hf(path, dtype=dtype, mesh=mesh)
  run = read_run_config(path)
  fields = dict(run["model"])
  fields["dtype"] = _log_dtype(spec, fields.get("dtype"), dtype)
  cfg = ModelConfig.from_dict(fields)
  graphdef, abstract = _abstract_model(cfg)
  params, _ = restore_model_params(path, abstract, sharding.state_shardings(abstract, mesh),
                                   mesh=mesh)
  return graphdef, params


# --- LoRA run directories: the adapters on their base, merged ----------------------------------

def lora_of(run: dict):
  """The LoraConfig of a run (its run_config.json) that trained LoRA adapters, else None."""
  block = run.get("lora")
  if not block or int(block.get("rank", 0) or 0) <= 0:
    return None
  from stable_alignment_jax.model import lora
  return lora.LoraConfig.from_config(block)


def restore_model_params(directory: str, abstract, shardings, *, mesh=None):
  """(plain model state, step) of any run directory: its `params` item; for a LoRA run (whose
  `params` are the adapters alone) the base it trained on, rebuilt from its
  checkpoint.init_from, with the adapters merged in (`lora_state`). `abstract` is the plain
  model's state: a LoRA run comes back as the same tree."""
  run = read_run_config(directory)
  if lora_of(run) is None:
    return restore_params(directory, abstract, shardings)
  if run.get("method", "preference") != "preference":
    raise ValueError(f"{directory}: a LoRA {run.get('method')} run (its params are adapters and "
                     "a head); load a preference stage's run directory, or PPO's exported policy")
  return lora_state(directory, abstract, shardings, mesh=mesh)


def lora_state(directory: str, abstract, shardings, *, mesh=None, run: dict | None = None):
  """(state, step): a LoRA run's base with W + (alpha / r) A.B in every targeted weight.

  The base is what the run trained on: checkpoint.init_from of its run_config.json (an HF
  directory or hub id, a run directory - itself LoRA or not -, random:<preset>[:seed], or ""
  for the random init of config.seed), in the run's param_dtype; with lora.quantize it is
  quantized and dequantized first, as training saw it, so the merged model computes what the
  adapters were trained against."""
  from stable_alignment_jax.model import lora
  run = run or read_run_config(directory)
  lcfg = lora_of(run)
  cfg = ModelConfig.from_dict(run["model"])
  mesh = mesh or sharding.make_mesh({"fsdp": -1})
  base = _lora_base(run, cfg, abstract, shardings, mesh, directory)
  _, ad_abstract = lora.abstract_adapters(cfg, lcfg)
  adapters, step = restore_params(directory, ad_abstract,
                                  sharding.state_shardings(ad_abstract, mesh))
  with sharding.activate(mesh):
    def merged(base, adapters):
      frozen = lora.frozen_base(cfg, lcfg, base)
      return lora.merge(frozen, adapters, lcfg, cfg if lcfg.quantize else None)
    state = jax.jit(merged, out_shardings=shardings)(base, adapters)
  return state, step


def _lora_base(run: dict, cfg: ModelConfig, abstract, shardings, mesh, directory: str):
  """The plain base state a LoRA run's adapters sit on (see `lora_state`)."""
  init = run.get("checkpoint", {}).get("init_from", "")
  if not init or init.startswith("random:"):
    seed = int(init.split(":")[2]) if init.count(":") >= 2 else (run.get("seed", 0) if not init
                                                                   else 0)
    with sharding.activate(mesh):
      return jax.jit(lambda: nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(seed)))[1],
                     out_shardings=shardings)()
  path = resolve(init)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory}: a LoRA run whose base checkpoint.init_from={init!r} "
                            "is not there (the run directory holds the adapters alone)")
  if is_hf_dir(path):
    fields = {k: getattr(cfg, k) for k in RUN_MODEL_FIELDS + ("max_seq_len",)}
    return load_hf(path, mesh=mesh, **fields)[1]
  return restore_model_params(path, abstract, shardings, mesh=mesh)[0]


def load_hf(path: str, *, mesh=None, dtype: str | None = None, **kw):
  """An HF directory as (graphdef, state), every weight placed on its logical-axis sharding over
  `mesh` (default: one device); dtype None is `compute_dtype`'s choice for the checkpoint."""
  from stable_alignment_jax.model import convert  # only HF users pay for its imports
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory not found: {path}")
  if dtype is None:
    dtype = compute_dtype(convert.checkpoint_dtype(convert.read_hf_json(path)[0]))
  shardings = None if mesh is None else (lambda abstract: sharding.state_shardings(abstract, mesh))
  return convert.load_hf(path, dtype=dtype, shardings=shardings, **kw)


def save_model(cfg: ModelConfig, state, directory: str, *, tokenizer: str = "",
               source: str = "") -> str:
  """Writes one model as a run directory (what a training run leaves, without optimizer state):
  `run_config.json` {model, data.tokenizer, source} and step 0 with the item `params`, so
  `load_model`, `init_from`, serve, SANDBOX and eval read it. Refuses a directory that already
  holds a checkpoint. Returns the absolute directory."""
  directory = os.path.abspath(os.path.expanduser(directory))
  with manager(directory, keep=1, async_save=False) as mgr:
    if mgr.latest_step() is not None:
      raise FileExistsError(f"{directory}: already holds a checkpoint (step "
                            f"{mgr.latest_step()}); give an empty or new directory")
    mgr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(flatten(state))))
    mgr.wait_until_finished()
  if jax.process_index() == 0:
    run = {"model": dataclasses.asdict(cfg), "data": {"tokenizer": tokenizer}, "source": source}
    with open(os.path.join(directory, RUN_CONFIG), "w") as f:
      json.dump(run, f, indent=2)
  return directory


def export_hf(run_dir: str, out: str, *, tokenizer: str | None = None, dtype: str | None = None,
              max_shard_bytes: int = 2 << 30, mesh=None) -> list[str]:
  """A run directory's latest params as an HF directory; returns the safetensors files written.
  A LoRA run is written merged: its base with the adapters' delta in every targeted weight.
  tokenizer: whose files, chat template and ids go along (default: the run's data.tokenizer);
  dtype: the tensors' storage dtype (default: the parameters')."""
  from stable_alignment_jax.model import convert
  from stable_alignment_jax.data.tokenizer import load_tokenizer
  run = read_run_config(run_dir)
  cfg = ModelConfig.from_dict(run["model"])
  mesh = mesh or sharding.make_mesh({"fsdp": -1})
  graphdef, abstract = _abstract_model(cfg)
  params, _ = restore_model_params(run_dir, abstract, sharding.state_shardings(abstract, mesh),
                                   mesh=mesh)
  spec = tokenizer or run.get("data", {}).get("tokenizer", "")
  files_from = os.path.expanduser(spec) if spec and os.path.exists(os.path.expanduser(spec)) \
      else None
  bos = eos = None
  if spec and not (files_from and os.path.exists(os.path.join(files_from, convert.GENERATION_CONFIG))):
    tok = load_tokenizer(spec)  # its ids, unless its own generation config comes along
    bos, eos = tok.bos_id, tok.eos_id
  return convert.save_hf(graphdef, params, out, dtype=dtype, max_shard_bytes=max_shard_bytes,
                         tokenizer=files_from, bos_id=bos if bos is None or bos >= 0 else None,
                         eos_id=eos if eos is None or eos >= 0 else None)


def export_peft(run_dir: str, out: str, *, mesh=None) -> str:
  """A LoRA run's adapters as a PEFT adapter directory (model/peft.py) for its HF base, the
  run's checkpoint.init_from (adapter_config.json's base_model_name_or_path); returns `out`.
  A QLoRA run's adapters were trained against its quantized base: on the unquantized HF base
  they compute within that quantization error of the run (as any QLoRA adapter does)."""
  from stable_alignment_jax.model import lora, peft
  run = read_run_config(run_dir)
  lcfg = lora_of(run)
  if lcfg is None:
    raise ValueError(f"{run_dir}: not a LoRA run (lora.rank is 0 in its {RUN_CONFIG}); "
                     "export the whole model with --to_hf")
  init = run.get("checkpoint", {}).get("init_from", "")
  path = resolve(init) if init and not init.startswith("random:") else ""
  if not (path and os.path.isdir(path) and is_hf_dir(path)):
    what = ("a random init" if not path else "not there" if not os.path.isdir(path) else
            "itself a LoRA run" if lora_of(read_run_config(path)) else "one of our run directories")
    raise ValueError(f"{run_dir}: a PEFT adapter goes onto an HF base, but this run's base "
                     f"checkpoint.init_from={init!r} is {what}; export the base with "
                     f"--from=BASE --to_hf=DIR (peft then loads the adapter onto DIR), or this "
                     "run merged with --to_hf")
  cfg = ModelConfig.from_dict(run["model"])
  mesh = mesh or sharding.make_mesh({"fsdp": -1})
  _, ad_abstract = lora.abstract_adapters(cfg, lcfg)
  adapters, _ = restore_params(run_dir, ad_abstract, sharding.state_shardings(ad_abstract, mesh))
  adapters = jax.device_get(nnx.to_pure_dict(adapters))
  return peft.write_adapter(out, lora.adapter_items(adapters, cfg), rank=lcfg.rank,
                            alpha=lcfg.alpha, dropout=lcfg.dropout, targets=lcfg.targets,
                            base_model=init)


# --- config.model from the init_from checkpoint ----------------------------------------------------------

# The run's own choices; every other ModelConfig field describes the checkpoint's weights.
RUN_MODEL_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers")
# data.tokenizer values that only stand in for "the model's tokenizer": configs/base.py's default
# and the byte tokenizer of the :tiny configs, neither of which fits an HF model's embedding.
PLACEHOLDER_TOKENIZERS = ("meta-llama/Llama-2-7b-hf", "byte")
_FILLED = "hf:"  # config.model.preset once filled from a checkpoint: "hf:<init_from>"


def fill_model_from_init(c, explicit=None) -> dict:
  """With a `checkpoint.init_from`, config.model (in place) from the checkpoint it names (an HF
  directory's config.json, or a previous run's run_config.json), and data.tokenizer from it when
  left at a placeholder (the HF directory's own tokenizer files, or the run's tokenizer); returns
  {field: (was, now)}. So a stage started from an HF model, and every stage after it, needs no
  model field typed.

  explicit: the config keys the user set on the command line ("model.dim", "data.tokenizer";
  main.py reads them from the config flag's overrides). A model field given there must agree
  with the checkpoint (floats to a relative 1e-6; max_seq_len may be shorter), else a ValueError
  names the field, both values and the file. None: nothing was set explicitly (programmatic
  callers). The fields of RUN_MODEL_FIELDS stay the run's. Marks config.model.preset
  "hf:<init_from>", so a second call (train.run after main.py) takes every field as the user's
  and only checks them.
  """
  init = c.checkpoint.init_from
  path = resolve(init) if init else ""
  if not init or not os.path.isdir(path):
    return {}
  if is_hf_dir(path):
    from stable_alignment_jax.model import convert
    source, file = convert.read_hf_config(path), os.path.join(path, "config.json")
    has_tokenizer = any(os.path.exists(os.path.join(path, f))
                        for f in ("tokenizer.json", "tokenizer.model"))
    tokenizer = path if has_tokenizer else ""
  elif os.path.exists(os.path.join(path, RUN_CONFIG)):
    run = read_run_config(path)
    source, file = ModelConfig.from_dict(run["model"]), os.path.join(path, RUN_CONFIG)
    tokenizer = run.get("data", {}).get("tokenizer", "")
  else:
    return {}
  explicit = set(explicit or ())
  if c.model.get("preset") == _FILLED + init:
    explicit |= {f"model.{k}" for k in c.model}
  changed = {}
  with c.unlocked():
    for field in (f for f in ModelConfig.__dataclass_fields__ if f not in RUN_MODEL_FIELDS):
      want, have = getattr(source, field), c.model.get(field)
      if f"model.{field}" in explicit:
        if not _agrees(field, have, want):
          raise ValueError(f"config.model.{field}={have!r} contradicts {file}, which says "
                           f"{want!r}; drop --config.model.{field} (the checkpoint sets it)")
        if field != "max_seq_len":
          c.model[field] = want  # equal within tolerance: the file's exact value
      elif have != want:
        c.model[field] = want
        changed[field] = (have, want)
    c.model.preset = _FILLED + init
    if tokenizer and "data.tokenizer" not in explicit and \
       c.data.tokenizer in PLACEHOLDER_TOKENIZERS and c.data.tokenizer != tokenizer:
      changed["data.tokenizer"] = (c.data.tokenizer, tokenizer)
      c.data.tokenizer = tokenizer
  if changed:
    print(f"config from {init}: " + ", ".join(f"{k}={v[1]!r}" for k, v in changed.items()),
          file=sys.stderr, flush=True)
  return changed


def _agrees(field: str, have, want) -> bool:
  if field == "max_seq_len":
    return 0 < have <= want  # a shorter training context of the same model
  if isinstance(want, float):
    return isinstance(have, (int, float)) and math.isclose(have, want, rel_tol=1e-6)
  return type(have) is type(want) and have == want
