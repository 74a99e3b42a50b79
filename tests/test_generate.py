"""KV-cache sampler: against a cache-free recompute, EOS/max_new_tokens per row, seeds, filtering,
batch independence of per-row parameters, one compile per shape bucket and cache window, and the
bf16 cache against the f32 one."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stable_alignment_jax.sampling import generate
from stable_alignment_jax.sampling.generate import Sampler, SamplingParams
from stable_alignment_jax.model import llama
from stable_alignment_jax.model.presets import preset

NO_EOS = -1  # an id no token has
PROMPT_LENS = (5, 17, 1, 30)  # mixed lengths in one left-padded batch
REF_LEN = 64  # fixed width of the recompute forward, so it compiles once


@pytest.fixture(scope="module")
def model():
  return llama.Llama(preset("tiny", dtype="float32"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(1)
  return [rng.integers(3, 1024, size=n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def sampler(model):
  return Sampler.from_module(model, eos_id=NO_EOS)


@pytest.fixture(scope="module")
def greedy32(sampler, prompts):
  return sampler.generate(prompts, SamplingParams(max_new_tokens=32))


def recompute_greedy(model, prompts, n_new):
  """Greedy decoding by re-running the whole sequence without a cache every step.

  Rows are right-padded to a fixed width (causal attention: padding after a row's last token
  cannot affect it) and use the default positions 0..T-1: none of the sampler's left padding,
  position offsets or cache writes are involved.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def last_logits(state, tokens, last):
    logits, _ = nnx.merge(graphdef, state)(tokens)
    return logits[jnp.arange(tokens.shape[0]), last]

  seqs = [list(p) for p in prompts]
  for _ in range(n_new):
    tokens = np.zeros((len(seqs), REF_LEN), np.int32)
    for i, s in enumerate(seqs):
      tokens[i, :len(s)] = s
    last = np.array([len(s) - 1 for s in seqs], np.int32)
    nxt = np.asarray(last_logits(state, tokens, last)).argmax(-1)
    for s, t in zip(seqs, nxt):
      s.append(int(t))
  return [s[len(p):] for s, p in zip(seqs, prompts)]


def test_greedy_kv_cache_equals_full_recompute(model, prompts, greedy32):
  assert [len(x) for x in greedy32] == [32] * len(prompts)
  assert greedy32 == recompute_greedy(model, prompts, 32)
  assert len({tuple(x) for x in greedy32}) == len(prompts)  # rows are not all one sequence


def test_eos_stops_each_row_independently(model, prompts, greedy32):
  # An EOS id that row 0 emits early and row 1 never does: row 0 stops there, row 1 runs on.
  row1 = set(greedy32[1])
  step, eos = next((j, t) for j, t in enumerate(greedy32[0][2:], 2) if t not in row1)
  out = Sampler.from_module(model, eos_id=eos).generate(prompts, SamplingParams(max_new_tokens=32))
  for row, full in zip(out, greedy32):
    expect = full[:full.index(eos) + 1] if eos in full else full
    assert row == expect  # through the first EOS (included), nothing after it
  assert out[0] == greedy32[0][:step + 1] and out[0][-1] == eos
  assert out[1] == greedy32[1]


def test_max_new_tokens_per_row(sampler, prompts, greedy32):
  limits = [3, 32, 0, 11]
  out = sampler.generate(prompts, [SamplingParams(max_new_tokens=m) for m in limits])
  assert out == [full[:m] for full, m in zip(greedy32, limits)]


def test_seeded_sampling_reproducible_and_seed_dependent(sampler, prompts):
  sp = lambda seed: SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed)
  a = sampler.generate(prompts, sp(7))
  assert a == sampler.generate(prompts, sp(7))
  b = sampler.generate(prompts, sp(8))
  assert a != b
  # Each row differs between seeds (1024-token vocab at temperature 1: collisions are rare).
  assert sum(x != y for x, y in zip(a, b)) >= 3
  assert all(0 <= t < 1024 for row in a + b for t in row)


def test_low_temperature_and_top_k_1_equal_greedy(sampler, prompts, greedy32):
  for sp in (SamplingParams(max_new_tokens=32, temperature=1e-5, seed=3),
             SamplingParams(max_new_tokens=32, temperature=1.5, top_k=1, seed=4),
             SamplingParams(max_new_tokens=32, temperature=1.5, top_p=1e-6, seed=5)):
    assert sampler.generate(prompts, sp) == greedy32, sp


def numpy_filter(logits, top_k, top_p):
  """The kept-token mask of top-k then top-p, written out per row with numpy."""
  keep = np.zeros(logits.shape, bool)
  for i, row in enumerate(logits.astype(np.float64)):
    order = np.argsort(-row)
    probs = np.exp(row[order] - row[order[0]])
    probs /= probs.sum()
    n_p = max(1, int(np.sum(np.cumsum(probs) - probs < top_p[i])))  # smallest prefix >= p
    n_k = top_k[i] if top_k[i] > 0 else len(row)
    keep[i, order[:min(n_k, n_p)]] = True
  return keep


def test_greedy_tokens_match_numpy_argmax_with_ties():
  from stable_alignment_jax.sampling.generate import greedy_tokens
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 50)).astype(np.float32)
  logits[1, [4, 9, 30]] = 9.0  # tied maxima: the first wins, as np.argmax
  logits[2] = 1.5  # all tied
  logits[3, 49] = 99.0  # the last id
  logits[4, :] = -np.inf
  logits[4, 17] = 0.0
  got = np.asarray(greedy_tokens(jnp.asarray(logits)))
  np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
  assert got.dtype == np.int32


def test_filter_logits_matches_numpy():
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(6, 50)) * 3).astype(np.float32)
  top_k = np.array([0, 1, 5, 0, 10, 3], np.int32)
  top_p = np.array([1.0, 1.0, 1.0, 0.5, 0.9, 0.2], np.float32)
  out = np.asarray(generate.filter_logits(jnp.asarray(logits), jnp.asarray(top_k),
                                          jnp.asarray(top_p)))
  keep = numpy_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(out), keep)
  np.testing.assert_array_equal(out[keep], logits[keep])  # kept logits pass through unchanged
  assert keep[0].all() and keep[1].sum() == 1 and keep[2].sum() == 5
  assert 1 < keep[3].sum() < 50  # the nucleus is a real cut here, not all or one


def test_sampled_first_tokens_stay_in_top_k(model, sampler):
  # 32 rows of one prompt with different seeds: draws spread over, and only over, the top 3.
  prompt = [5, 9, 200, 31]
  logits, _ = model(jnp.asarray([prompt]))
  top3 = set(np.argsort(-np.asarray(logits[0, -1]))[:3].tolist())
  out = sampler.generate([prompt] * 32, [SamplingParams(max_new_tokens=1, temperature=2.0,
                                                        top_k=3, seed=s) for s in range(32)])
  first = {row[0] for row in out}
  assert first <= top3 and len(first) >= 2


def test_per_row_params_equal_each_row_alone(sampler, prompts):
  params = [SamplingParams(max_new_tokens=12),
            SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=1),
            SamplingParams(max_new_tokens=7, temperature=1.2, top_k=5, seed=2),
            SamplingParams(max_new_tokens=16, temperature=0.7, seed=3)]
  together = sampler.generate(prompts, params)
  alone = [sampler.generate([p], [sp])[0] for p, sp in zip(prompts, params)]
  assert together == alone
  assert [len(x) for x in together] == [12, 20, 7, 16]


def test_one_compile_per_shape_bucket(model):
  s = Sampler.from_module(model, eos_id=NO_EOS)  # min_window 32: these buckets have one window
  base = (generate._prefill._cache_size(), generate._decode._cache_size())
  size = lambda: _programs(base)
  start = 0
  s.generate([[1, 2, 3], [4] * 9], SamplingParams(max_new_tokens=20))  # bucket b2 p16 n32
  assert size() == start + 1
  s.generate([[7] * 12, [8, 9]], SamplingParams(max_new_tokens=25))  # same bucket
  s.generate([[7] * 16], SamplingParams(max_new_tokens=32))  # b1: a new bucket
  assert size() == start + 2
  s.generate([[7] * 16], SamplingParams(max_new_tokens=30))
  assert size() == start + 2
  s.generate([[1] * 17, [2]], SamplingParams(max_new_tokens=20))  # p32: new
  assert size() == start + 3
  assert s.calls == 5
  # Streaming in chunks of any size reuses the same two programs.
  list(s.stream([[7] * 16], SamplingParams(max_new_tokens=30), chunk=3))
  list(s.stream([[7] * 16], SamplingParams(max_new_tokens=30), chunk=5))
  assert size() == start + 3


def test_one_decode_program_per_window(model, prompts, greedy32):
  # min_window 4 and 32 new tokens: windows of 4, 8, 16 and 32 slots after the prompt, each
  # compiled once (and three growths), whatever the stream chunk; the tokens are unchanged. The
  # prompts twice over: a batch bucket (8) no other test compiles, so the counts start at 0.
  s = Sampler.from_module(model, eos_id=NO_EOS, min_window=4)
  prompts, greedy32 = prompts * 2, greedy32 * 2
  fns = (generate._prefill, generate._decode, generate._grow)
  base = [f._cache_size() for f in fns]
  grew = lambda: [f._cache_size() - b for f, b in zip(fns, base)]
  assert s.generate(prompts, SamplingParams(max_new_tokens=32)) == greedy32
  assert grew() == [1, 4, 3]
  chunks = list(s.stream(prompts, SamplingParams(max_new_tokens=32), chunk=3))
  assert chunks[-1] == greedy32 and len(chunks) == 11  # chunks end at 3, 6, ..., 30, 32
  assert [len(r) for r in chunks[2]] == [9] * 8  # a chunk crossing windows 8 -> 16 runs whole
  assert s.generate(prompts, SamplingParams(max_new_tokens=20)) == [r[:20] for r in greedy32]
  assert grew() == [1, 4, 3]
  # A smaller new-token bucket (8) has its own prefill and windows 4 and 8.
  assert s.generate(prompts, SamplingParams(max_new_tokens=6)) == [r[:6] for r in greedy32]
  assert grew() == [2, 6, 4]


def test_bf16_cache_tracks_the_f32_cache(model, prompts, greedy32):
  """A bf16 KV cache under f32 compute: the decode logits are within 0.05 (absolute; the tiny
  model's logits have std ~1) of the cache-free forward, and greedy tokens agree with the f32
  cache on >= 90% of the steps before each row's first difference (near-ties may flip)."""
  s = Sampler.from_module(model, eos_id=NO_EOS, cache_dtype="bfloat16")
  out = s.generate(prompts, SamplingParams(max_new_tokens=32))
  before = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), 32)
            for x, y in zip(out, greedy32)]
  assert np.mean(before) / 32 >= 0.9, before
  # Logits teacher-forced on the f32 tokens: prefill, then one decode step at a time.
  seq = jnp.asarray([prompts[3] + greedy32[3]])
  p, t = len(prompts[3]), seq.shape[1]
  full, _ = model(seq)
  cache = llama.init_cache(model.cfg, 1, t, dtype="bfloat16")
  _, cache = model(seq[:, :p], cache=cache, cache_index=0)
  steps = []
  for i in range(p, t):
    logits, cache = model(seq[:, i:i + 1], positions=jnp.full((1, 1), i), cache=cache,
                          cache_index=jnp.int32(i))
    steps.append(logits[0, 0])
  assert jax.tree.leaves(cache)[0].dtype == jnp.bfloat16
  err = np.abs(np.asarray(jnp.stack(steps)) - np.asarray(full[0, p:]))
  assert 1e-4 < err.max() < 0.05, err.max()  # rounded (not an f32 cache), but only just
  with pytest.raises(ValueError, match="cache_dtype"):
    Sampler.from_module(model, eos_id=NO_EOS, cache_dtype="int4")


def _programs(base):
  """New programs per bucket: prefill and decode compile once each, so their counts agree."""
  grew = (generate._prefill._cache_size() - base[0], generate._decode._cache_size() - base[1])
  assert grew[0] == grew[1], grew
  return grew[0]


def test_stream_yields_partial_rows_then_the_generate_result(sampler, prompts, greedy32):
  params = SamplingParams(max_new_tokens=32)
  chunks = list(sampler.stream(prompts, params, chunk=8))
  assert chunks[-1] == greedy32
  assert len(chunks) == 4  # 32 steps in chunks of 8; no row stops early without an EOS
  for i, c in enumerate(chunks):
    for row, full in zip(c, greedy32):
      assert row == full[:len(row)]  # each yield is a prefix of the final row
      assert len(row) == min(len(full), 8 * (i + 1))


def test_stream_stops_each_row_at_any_of_several_stop_ids(model, prompts, greedy32):
  # Two stop ids taken from the greedy output itself: each row ends at the first of either.
  stops = [greedy32[0][5], greedy32[1][3]]
  s = Sampler.from_module(model, eos_id=stops)
  out = s.generate(prompts, SamplingParams(max_new_tokens=32))
  for row, full in zip(out, greedy32):
    cut = next((j + 1 for j, t in enumerate(full) if t in stops), len(full))
    assert row == full[:cut]


def test_next_token_logprobs_match_the_full_forward(model, prompts):
  s = Sampler.from_module(model, eos_id=NO_EOS)
  ids = [3, 17, 500]
  got = s.next_token_logprobs(prompts, ids)
  for row, p in zip(got, prompts):
    logits, _ = model(jnp.asarray([p]))
    ref = np.asarray(jax.nn.log_softmax(logits[0, -1]))[ids]
    np.testing.assert_allclose(row, ref, atol=1e-5)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    s.next_token_logprobs(prompts, [10**6])


def test_bad_input_is_rejected(sampler):
  with pytest.raises(ValueError, match="empty prompt"):
    sampler.generate([[1, 2], []])
  with pytest.raises(ValueError, match="2 prompts but 1 sampling params"):
    sampler.generate([[1], [2]], [SamplingParams()])
  with pytest.raises(ValueError, match="exceeds the model context"):
    sampler.generate([[1] * 400], SamplingParams(max_new_tokens=200))
  for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=-1)):
    with pytest.raises(ValueError):
      SamplingParams(**bad)
  assert sampler.generate([]) == []


def test_sharded_sampler_matches_single_device(prompts, greedy32):
  # Weights born sharded over data=2 x fsdp=2 x tensor=2 (same init seed as the `model` fixture);
  # the decode cache is pinned by logical names too, also as it grows (windows 8, 16, 32). The
  # tokens must not change.
  from stable_alignment_jax.model import sharding
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg = preset("tiny", dtype="float32")
  graphdef, state = sharding.build_sharded(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)), mesh)
  s = Sampler(graphdef, state, eos_id=NO_EOS, mesh=mesh, min_window=8)
  assert s.generate(prompts, SamplingParams(max_new_tokens=32)) == greedy32


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_a_training_runs_remat_policy_does_not_reach_the_sampler(model, prompts, greedy32, remat):
  # A stage run directory keeps the remat it trained with; sampling from it must work the same.
  cfg = dataclasses.replace(model.cfg, remat=remat)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))))
  s = Sampler(graphdef, nnx.state(model), eos_id=NO_EOS)
  assert s.cfg.remat == "none" and not s.cfg.scan_layers
  assert s.generate(prompts, SamplingParams(max_new_tokens=32)) == greedy32


@pytest.mark.parametrize("batch", [1, 4])
def test_the_compiled_decode_loop_writes_the_cache_in_place(model, batch, monkeypatch):
  """The sampler's decode program, compiled as it runs, holds no cache-sized copy: each step's
  write into a layer's donated cache is done in place (with a [B,K,...] cache, XLA's CPU backend
  copied every cache 4x a step at batch 1)."""
  seen = []
  decode = generate._decode

  def spy(*args, **kw):
    seen.append((jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), args), kw))
    return decode(*args, **kw)

  monkeypatch.setattr(generate, "_decode", spy)
  s = Sampler.from_module(model, eos_id=NO_EOS, min_prompt=8, min_window=0)
  s.generate([[5, 6, 7]] * batch, SamplingParams(max_new_tokens=29))  # 8 + 32 = 40 slots
  (args, kw), = seen
  hlo = decode.lower(*args, **kw).compile().as_text()
  c = model.cfg
  n = batch * c.n_kv_heads
  shapes = (f"f32[{n},{c.head_dim},40]", f"f32[{n},40,{c.head_dim}]")
  assert sum(f"= {x}" in line for line in hlo.splitlines() for x in shapes) >= 2 * c.n_layers
  copies = [line for line in hlo.splitlines()
            if any(f"= {x}" in line for x in shapes) and " copy(" in line]
  assert copies == [], copies


def test_decode_takes_the_cpu_compile_options_only_where_xla_knows_them(monkeypatch):
  try:
    generate.decode_compiler_options.cache_clear()
    assert generate.decode_compiler_options() == (
        generate._CPU_DECODE_OPTIONS if jax.default_backend() == "cpu" else {})
    # An XLA that does not know an option refuses it; decode then compiles without options.
    monkeypatch.setattr(generate, "_CPU_DECODE_OPTIONS", {"xla_no_such_option_here": ""})
    generate.decode_compiler_options.cache_clear()
    assert generate.decode_compiler_options() == {}
    with pytest.raises(jax.errors.JaxRuntimeError, match="xla_no_such_option_here"):
      jax.jit(lambda x: x, compiler_options=generate._CPU_DECODE_OPTIONS)(jnp.zeros(1))
  finally:
    monkeypatch.undo()
    generate.decode_compiler_options.cache_clear()
