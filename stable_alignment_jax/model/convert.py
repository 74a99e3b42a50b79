"""Hugging Face checkpoints in and out: `config.json` + `*.safetensors` <-> NNX state.

Reads and writes LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
Gemma2ForCausalLM and Gemma3ForCausalLM (LLaMA 1-3.2, SmolLM2, Mistral, Qwen2/2.5/3, Gemma 2/3
text): tied or untied head, RoPE scaling "linear" / "llama3", an explicit `head_dim`, sliding
windows. Anything else (other biases, activations or RoPE types, multimodal checkpoints) is
refused naming the file and the field (`hf_config.py`): we never silently compute a different
model.

Import streams: the model is built abstractly (`nnx.eval_shape`), then each parameter is read
from its safetensors file alone, converted on the host and placed straight onto its sharding, so
the host holds about one (layer-stacked, with `scan_layers`) tensor at a time. Export gathers one
parameter at a time to the host and writes shards of at most `max_shard_bytes` (process 0 writes).

Layouts (HF stores torch Linear weights as [out, in]; ours are einsum-shaped [in, ..., out]; with
`scan_layers` each layer tensor is row `i` of one stacked [L, ...] parameter `layers/...`):
  model.embed_tokens.weight [V,D]           -> embed [V,D]
  layers.i.self_attn.q_proj.weight [H*E,D]  -> layers[i].attn.wq [D,H,E]   (.T, reshape)
  k_proj / v_proj [K*E,D]                   -> wk / wv [D,K,E]
  o_proj.weight [D,H*E]                     -> wo [H,E,D]                  (.T, reshape)
  mlp.gate_proj / up_proj [F,D]             -> mlp.w_gate / w_up [D,F]     (.T)
  mlp.down_proj [D,F]                       -> mlp.w_down [F,D]            (.T)
  input_layernorm / post_attention_layernorm -> attn_norm.scale / mlp_norm.scale
  q_proj / k_proj / v_proj.bias [n*E]       -> attn.bq / bk / bv [n,E]     (Qwen2)
  self_attn.q_norm / k_norm.weight [E]      -> attn.q_norm / k_norm.scale  (Qwen3, Gemma 3)
  Gemma: post_attention_layernorm -> attn_post_norm.scale, pre_feedforward_layernorm ->
  mlp_norm.scale, post_feedforward_layernorm -> mlp_post_norm.scale (norm weights as stored:
  the model adds Gemma's 1)
  model.norm.weight -> final_norm.scale;  lm_head.weight [V,D] -> lm_head [D,V] (.T; absent tied)
HF LLaMA applies RoPE in the rotate-half form, as `llama.rope` does, so q/k need no permutation.

This module knows only the model: the checkpoint kinds of our runs, compute-dtype policy, meshes
and tokenizers are `checkpoints.py`'s (the shardings arrive as a function of the abstract state).
CLI (writes and reads run directories, through `checkpoints.py`):
  python -m stable_alignment_jax.convert --from_hf=HF_DIR --to=RUN_DIR
  python -m stable_alignment_jax.convert --from=RUN_DIR --to_hf=HF_DIR [--tokenizer=PATH]
"""

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
from typing import Callable

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors' numpy reader takes bf16)
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from stable_alignment_jax.model import llama
from stable_alignment_jax.model.hf_config import (  # noqa: F401  (re-exported: convert's API)
    CheckpointError, checkpoint_dtype, config_from_hf, config_to_hf, read_hf_config, read_hf_json)
from stable_alignment_jax.model.presets import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
# Older conversions saved the rotary buffer; it is derived from rope_theta, so it is skipped.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# What serving a checkpoint needs beside the weights, copied verbatim in both directions.
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
_SIDE_FILES = _TOKENIZER_FILES + (GENERATION_CONFIG,)


# ----------------------------------------------------------------------------- name mapping


@dataclasses.dataclass(frozen=True)
class _Entry:
  path: tuple  # our NNX state path
  layer: int | None  # the row of a stacked [L, ...] parameter (scan_layers), else None
  hf_name: str
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _mapping(cfg: ModelConfig) -> list[_Entry]:
  """Every HF tensor, grouped by our parameter (all layers of one stacked parameter adjacent)."""
  d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
  h, k, e = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  same = lambda x: x
  t = lambda x: x.T

  def in_heads(n):  # [n*E, D] <-> [D, n, E]
    return (lambda x: x.T.reshape(d, n, e), lambda x: x.reshape(d, n * e).T)

  gemma = cfg.post_norms  # Gemma's names: post_attention_layernorm is the attention's post-norm
  per_layer = [
      (("attn_norm", "scale"), "input_layernorm.weight", (d,), same, same),
      (("attn", "wq"), "self_attn.q_proj.weight", (h * e, d), *in_heads(h)),
      (("attn", "wk"), "self_attn.k_proj.weight", (k * e, d), *in_heads(k)),
      (("attn", "wv"), "self_attn.v_proj.weight", (k * e, d), *in_heads(k)),
      (("attn", "wo"), "self_attn.o_proj.weight", (d, h * e),
       lambda x: x.T.reshape(h, e, d), lambda x: x.reshape(h * e, d).T),
      (("mlp_norm", "scale"), ("pre_feedforward_layernorm.weight" if gemma else
                               "post_attention_layernorm.weight"), (d,), same, same),
      (("mlp", "w_gate"), "mlp.gate_proj.weight", (f, d), t, t),
      (("mlp", "w_up"), "mlp.up_proj.weight", (f, d), t, t),
      (("mlp", "w_down"), "mlp.down_proj.weight", (d, f), t, t),
  ]
  if cfg.qkv_bias:  # [n*E] <-> [n, E]
    per_layer += [(("attn", f"b{x}"), f"self_attn.{x}_proj.bias", (n * e,),
                   lambda b, n=n: b.reshape(n, e), lambda b, n=n: b.reshape(n * e))
                  for x, n in (("q", h), ("k", k), ("v", k))]
  if cfg.qk_norm:
    per_layer += [(("attn", f"{x}_norm", "scale"), f"self_attn.{x}_norm.weight", (e,), same, same)
                  for x in ("q", "k")]
  if cfg.post_norms:
    per_layer += [(("attn_post_norm", "scale"), "post_attention_layernorm.weight", (d,), same, same),
                  (("mlp_post_norm", "scale"), "post_feedforward_layernorm.weight", (d,), same,
                   same)]
  out = [_Entry(("embed",), None, "model.embed_tokens.weight", (v, d), same, same)]
  for sub, name, shape, to_ours, to_hf in per_layer:
    for i in range(cfg.n_layers):
      path, layer = (("layers",) + sub, i) if cfg.scan_layers else (("layers", i) + sub, None)
      out.append(_Entry(path, layer, f"model.layers.{i}.{name}", shape, to_ours, to_hf))
  out.append(_Entry(("final_norm", "scale"), None, "model.norm.weight", (d,), same, same))
  if not cfg.tie_embeddings:
    out.append(_Entry(("lm_head",), None, "lm_head.weight", (v, d), t, t))
  return out


def _our_shape(group: list[_Entry]) -> tuple[int, ...]:
  one = group[0].to_ours(np.empty(group[0].hf_shape, np.int8)).shape
  return one if group[0].layer is None else (len(group),) + one


def _groups(entries: list[_Entry]):
  return [list(g) for _, g in itertools.groupby(entries, key=lambda en: en.path)]


# ----------------------------------------------------------------------------- import


def _weight_map(directory: str) -> tuple[dict[str, str], str]:
  """tensor name -> shard file name, and the file that told us so (for error messages)."""
  index_path = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index_path):
    with open(index_path) as fh:
      try:
        weight_map = json.load(fh)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index ({e})") from e
    for name, shard in weight_map.items():
      if not os.path.exists(os.path.join(directory, shard)):
        raise CheckpointError(f"{index_path}: shard file {shard!r} (holding tensor {name!r}) "
                              f"does not exist in {directory}")
    return weight_map, index_path
  files = sorted(x for x in os.listdir(directory) if x.endswith(".safetensors"))
  if not files:
    raise CheckpointError(f"{directory}: no *.safetensors files (and no {INDEX_FILE}); "
                          f"PyTorch .bin checkpoints are not supported")
  weight_map: dict[str, str] = {}
  for shard in files:
    with safe_open(os.path.join(directory, shard), framework="numpy") as fh:
      for name in fh.keys():
        if name in weight_map:
          raise CheckpointError(f"{directory}: tensor {name!r} appears in both "
                                f"{weight_map[name]} and {shard}")
        weight_map[name] = shard
  return weight_map, os.path.join(directory, files[0] if len(files) == 1 else "*.safetensors")


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
  """An uninitialised host array whose data starts on an `align`-byte boundary: XLA's CPU client
  adopts such a buffer as the device array, and copies one that numpy happened to place off the
  boundary (a second parameter-sized host buffer, depending on where malloc put the first)."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.empty(nbytes + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def load_hf(directory: str, *, dtype: str | None = None, param_dtype: str = "float32",
            shardings: Callable | None = None, **overrides):
  """Reads a HF LLaMA directory into (graphdef, state) of `llama.Llama`.

  dtype: compute dtype (default: the checkpoint's own, float32 when it names none;
  `checkpoints.load_model` applies the project's policy); param_dtype: storage dtype of the
  weights; shardings: abstract state -> the sharding of every weight (`checkpoints.load_hf`
  passes the logical-axis rules over a mesh; default: one device). Extra keyword arguments set
  our own ModelConfig fields (remat, scan_layers, max_seq_len, ...).
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory not found: {directory}")
  config_json, config_path = read_hf_json(directory)
  if dtype is None:
    dtype = checkpoint_dtype(config_json) or "float32"
  cfg = config_from_hf(config_json, config_path, dtype=dtype, param_dtype=param_dtype,
                       **overrides)
  weight_map, source = _weight_map(directory)
  entries = _mapping(cfg)
  expected = {en.hf_name for en in entries}
  tied_head = cfg.tie_embeddings and "lm_head.weight" in weight_map
  for name in weight_map:
    if name not in expected and not name.endswith(_IGNORED_SUFFIXES) and not (
        tied_head and name == "lm_head.weight"):
      raise CheckpointError(f"{os.path.join(directory, weight_map[name])}: unexpected tensor "
                            f"{name!r} (not part of a LLaMA with this config.json)")
  for en in entries:
    if en.hf_name not in weight_map:
      raise CheckpointError(f"{source}: missing tensor {en.hf_name!r}")

  abstract = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  if shardings is not None:
    shardings = shardings(abstract_state)
  values = {}
  with contextlib.ExitStack() as stack:
    handles = {}

    def read(name, shape):
      shard = weight_map[name]
      file = os.path.join(directory, shard)
      if shard not in handles:
        handles[shard] = stack.enter_context(safe_open(file, framework="numpy"))
      fh = handles[shard]
      if name not in fh.keys():
        raise CheckpointError(f"{file}: missing tensor {name!r} (listed in {source})")
      got = tuple(fh.get_slice(name).get_shape())
      if got != shape:
        raise CheckpointError(f"{file}: tensor {name!r} has shape {got}, {config_path} "
                              f"implies {shape}")
      return fh.get_tensor(name)

    if tied_head:  # a tied checkpoint that saved its head anyway: fine when it is the embedding
      if not np.array_equal(read("lm_head.weight", (cfg.vocab_size, cfg.dim)),
                            read("model.embed_tokens.weight", (cfg.vocab_size, cfg.dim))):
        raise CheckpointError(f"{os.path.join(directory, weight_map['lm_head.weight'])}: tensor "
                              f"'lm_head.weight' differs from 'model.embed_tokens.weight' but "
                              f"{config_path} says tie_word_embeddings=true")
    for group in _groups(entries):
      path, shape = group[0].path, _our_shape(group)
      want = _lookup(abstract_state, path)
      if tuple(want.shape) != shape:
        raise ValueError(f"parameter {'/'.join(map(str, path))}: the model has shape "
                         f"{tuple(want.shape)}, the checkpoint layout gives {shape}")
      host = _aligned_empty(shape, param_dtype)
      if group[0].layer is None:  # one copy: the layout change and the cast happen together
        host[...] = group[0].to_ours(read(group[0].hf_name, group[0].hf_shape))
      else:  # the stacked parameter, filled row by row
        for en in group:
          host[en.layer] = en.to_ours(read(en.hf_name, en.hf_shape))
      if shardings is None:
        values[path] = jax.device_put(host)
      else:
        sh = _lookup(shardings, path)
        sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
        values[path] = jax.make_array_from_callback(host.shape, sh, lambda i, a=host: a[i])
      # The copy to the device is asynchronous and keeps `host` alive until it is done; waiting
      # for it keeps one parameter on the host at a time (else the next one is staged beside it).
      jax.block_until_ready(values[path])
      del host
  state = jax.tree.map_with_path(
      lambda p, var: var.replace(values[tuple(_key(x) for x in p)]), abstract_state,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, state


def _key(entry):
  return getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))


def _lookup(tree, path):
  for p in path:
    tree = tree[p]
  return tree


# ----------------------------------------------------------------------------- export


def _to_host(x) -> np.ndarray:
  """One parameter, gathered whole to this host (a collective on multi-host)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def save_hf(graphdef_or_cfg, state, directory: str, *, dtype: str | None = None,
            max_shard_bytes: int = 2 << 30, tokenizer: str | None = None,
            bos_id: int | None = None, eos_id: int | list[int] | None = None) -> list[str]:
  """Writes `state` as a HF LLaMA directory; returns the safetensors file names written.

  dtype: storage dtype of the written tensors (default: the parameters' dtype). Host memory
  peaks at one shard (<= max_shard_bytes) plus one (stacked) parameter. tokenizer: a `.model`
  file or a directory whose tokenizer files, chat template and generation_config.json are copied
  next to the weights. bos_id / eos_id (eos may be a list) override the generation config's.
  """
  cfg = graphdef_or_cfg if isinstance(graphdef_or_cfg, ModelConfig) else \
      nnx.merge(graphdef_or_cfg, state).cfg
  pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
  entries = _mapping(cfg)
  dtype = str(np.dtype(dtype or _lookup(pure, entries[0].path).dtype))
  config_to_hf(cfg, dtype)  # a model no HF family computes is refused before any file is written
  itemsize = np.dtype(dtype).itemsize
  for group in _groups(entries):
    got = tuple(_lookup(pure, group[0].path).shape)
    if got != _our_shape(group):
      raise ValueError(f"parameter {'/'.join(map(str, group[0].path))} has shape {got}, which "
                       f"does not match the model config ({_our_shape(group)})")
  # Plan shards from the shapes first, so files can be named "-0000i-of-0000n" while streaming.
  plan: list[list[_Entry]] = [[]]
  size = 0
  for en in entries:
    nbytes = int(np.prod(en.hf_shape)) * itemsize
    if plan[-1] and size + nbytes > max_shard_bytes:
      plan.append([])
      size = 0
    plan[-1].append(en)
    size += nbytes
  n = len(plan)
  names = [SINGLE_FILE] if n == 1 else \
      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(directory, exist_ok=True)
  weight_map, total, held = {}, 0, {}  # held: the one parameter gathered to the host
  for name, group in zip(names, plan):
    tensors = {}
    for en in group:
      if en.path not in held:
        held.clear()
        held[en.path] = _to_host(_lookup(pure, en.path))
      value = held[en.path] if en.layer is None else held[en.path][en.layer]
      if writer:
        tensors[en.hf_name] = np.ascontiguousarray(en.to_hf(value), dtype=dtype)
        weight_map[en.hf_name] = name
        total += tensors[en.hf_name].nbytes
    if writer:
      save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
    del tensors
  held.clear()
  if not writer:
    return names
  if n > 1:
    with open(os.path.join(directory, INDEX_FILE), "w") as fh:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
  bos_id, eos_id = _side_files(tokenizer, directory, bos_id, eos_id)
  with open(os.path.join(directory, "config.json"), "w") as fh:
    json.dump(config_to_hf(cfg, dtype, bos_id, eos_id), fh, indent=2)
  return names


def _side_files(tokenizer: str | None, directory: str, bos_id, eos_id):
  """Copies the tokenizer's files (and generation config) into `directory`, writes
  generation_config.json when the source had none or ids were given; returns (bos, eos).
  Callers that know the tokenizer's ids pass them (`checkpoints.export_hf` does)."""
  gen_path = os.path.join(directory, GENERATION_CONFIG)
  if tokenizer:
    copy_tokenizer_files(tokenizer, directory)
  gen = {}
  if os.path.exists(gen_path):
    with open(gen_path) as fh:
      gen = json.load(fh)
  given = {k: v for k, v in (("bos_token_id", bos_id), ("eos_token_id", eos_id)) if v is not None}
  if given or not gen:
    gen = {**gen, **given}
    gen.setdefault("bos_token_id", 1)
    gen.setdefault("eos_token_id", 2)
    with open(gen_path, "w") as fh:
      json.dump(gen, fh, indent=2)
  return gen.get("bos_token_id", 1), gen.get("eos_token_id", 2)


def copy_tokenizer_files(path: str, directory: str) -> list[str]:
  """A `.model` file becomes `tokenizer.model`; a directory gives its tokenizer files, chat
  template and generation_config.json (those present)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer not found: {path}")
  os.makedirs(directory, exist_ok=True)
  if os.path.isfile(path):
    shutil.copyfile(path, os.path.join(directory, "tokenizer.model"))
    return ["tokenizer.model"]
  copied = []
  for name in _SIDE_FILES:
    src, dst = os.path.join(path, name), os.path.join(directory, name)
    if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(dst):
      shutil.copyfile(src, dst)
      copied.append(name)
  return copied


if __name__ == "__main__":
  # The CLI writes run directories, so it lives with them (stable_alignment_jax/convert.py);
  # this path keeps working. Run as a script this file is `__main__`, which nothing imports.
  import runpy
  runpy.run_module("stable_alignment_jax.convert", run_name="__main__", alter_sys=True)
