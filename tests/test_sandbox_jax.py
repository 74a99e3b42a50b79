"""A 9-agent society with the in-process JAX backend: two tiny checkpoints in one society,
one `Sampler.generate` per checkpoint per phase, outputs equal to a direct generate of the
logged prompts, and an export that validates against DESIGN.md."""

import dataclasses
import json
import os

import ml_collections
import numpy as np
import pytest

from configs import sandbox as sandbox_config
from stable_alignment_jax.sampling.generate import SamplingParams
from stable_alignment_jax.sandbox import export, runner
from stable_alignment_jax.sandbox.store import Store
from stable_alignment_jax.data.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_PROMPT = 128


def _config(store: str, qf: str, pf: str):
  c = sandbox_config.get_config("tiny")
  c.store = store
  c.rating_mode = "text"  # the generate-per-phase checks below; choice: test_rating_choice.py
  c.world.question_file, c.world.prior_file = qf, pf
  c.backends.local.max_prompt_tokens = MAX_PROMPT
  c.backends.local.models = ml_collections.ConfigDict({"m0": "random:tiny:0",
                                                       "m1": "random:tiny:1"})
  c.backends.local.model = ""  # every name must be mapped
  c.agent_models = ml_collections.ConfigDict({
      "a": dict(backend="local", model="m0", count=4),
      "b": dict(backend="local", model="m1", count=-1)})
  c.observer = ml_collections.ConfigDict(dict(backend="local", model="m0"))
  for role in ("draft", "feedback", "revise", "observe"):
    c.sampling[role].max_tokens = 12
  return c


@pytest.fixture
def pool(sandbox_pool):
  return sandbox_pool


def test_jax_society_two_rounds(tmp_path, pool):
  cfg = _config(str(tmp_path / "j.sqlite"), *pool)
  backends = runner.make_backends(cfg)  # loaded once, reused below for the direct check
  local = backends["local"]
  assert sorted(local.models) == ["random:tiny:0", "random:tiny:1"]
  runner.start(cfg, progress=False, backends=backends)
  out = tmp_path / "j.jsonl"
  assert export.write_jsonl(cfg.store, str(out)) == 18
  recs = export.read_jsonl(str(out))  # validates every record against the export contract
  assert [(r["round"], r["agent"]) for r in recs] == [(r, a) for r in range(2) for a in range(9)]
  assert {r["agent_model"] for r in recs} == {"local/m0", "local/m1"}
  assert sum(r["agent_model"] == "local/m0" for r in recs) == 2 * 4
  s = Store(cfg.store)
  steps = s.step_rows()
  calls = s.db.execute("SELECT model, prompt, params, seed, text FROM calls").fetchall()
  s.close()
  assert len(steps) == 2
  n_calls = sum(4 + len(r["feedback"]) for r in recs)
  assert len(calls) == n_calls
  for r, _, _, c in steps:
    # Phases A, B, C use both checkpoints (drafts/ratings/revisions of m0 and m1 agents; the
    # m0 observer in B); phase D is the m0 observer alone: 2+2+2+1 generate calls.
    assert c["generate_calls"] == 7, c
    assert c["calls"] == sum(4 + len(x["feedback"]) for x in recs if x["round"] == r)
    # A random model does not write the rating format: every rating is null and counted.
    assert c["feedback_unparsed"] == c["feedback_total"] > 0
  assert all(f["rating"] is None for r in recs for f in r["feedback"])
  assert all(r["draft"]["moral"] is None for r in recs)

  # Re-generate a sample of logged calls directly: byte-encode with BOS, keep the last
  # MAX_PROMPT tokens, decode up to EOS. Rows are batched in a different order and company
  # than in the run, which must not change any row.
  tok = ByteTokenizer()
  outputs = {}
  picked, per_kind = {"m0": [], "m1": []}, {}
  for model, prompt, params, seed, text in sorted(calls):
    kind = (model, prompt[:16])  # up to 2 calls of each role: greedy and sampled rows mix
    per_kind[kind] = per_kind.get(kind, 0) + 1
    if per_kind[kind] <= 2:
      picked[model].append((prompt, json.loads(params), seed, text))
  assert len(picked["m0"]) == 8 and len(picked["m1"]) == 6  # the observer is m0 only
  for model, spec in (("m0", "random:tiny:0"), ("m1", "random:tiny:1")):
    sampler = local.models[spec].ts.sampler
    before = sampler.calls
    prompts, sps = [], []
    for prompt, p, seed, _ in reversed(picked[model]):
      ids = [tok.bos_id] + [b + 3 for b in prompt.encode("utf-8")]
      if len(ids) > MAX_PROMPT:
        ids = ids[:1] + ids[-(MAX_PROMPT - 1):]
      prompts.append(ids)
      sps.append(SamplingParams(max_new_tokens=p["max_tokens"], temperature=p["temperature"],
                                top_p=p["top_p"], seed=seed))
    new = sampler.generate(prompts, sps)
    outputs[model] = (prompts, sps, new)
    for (prompt, p, seed, text), ids in zip(reversed(picked[model]), new):
      ids = [i for i in ids if i != tok.eos_id]
      want = bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")
      assert text == want, (model, prompt[-60:])
    assert sampler.calls == before + 1
  # The two checkpoints really differ (distinct seeds): m1 continues m0's prompts differently.
  prompts, sps, new = outputs["m0"]
  assert local.models["random:tiny:1"].ts.sampler.generate(prompts, sps) != new


def test_jax_backend_bad_input_fails_before_the_run(tmp_path, pool):
  cfg = _config(str(tmp_path / "x.sqlite"), *pool)
  cfg.observer.model = "judge"  # not mapped, and no default `model`
  with pytest.raises(KeyError, match=r"agent model 'judge' is not in config.backends.local.models"):
    runner.start(cfg, progress=False)
  cfg = _config(str(tmp_path / "x.sqlite"), *pool)
  cfg.backends.local.models.m1 = str(tmp_path / "no_such_run")
  with pytest.raises(FileNotFoundError, match="no_such_run"):
    runner.start(cfg, progress=False)
  cfg = _config(str(tmp_path / "x.sqlite"), *pool)
  cfg.backends.local.models = ml_collections.ConfigDict({"m0": "random:tiny:0", "m1": dict(
      spec="random:tiny:1", tokenizer=str(tmp_path / "nope.model"))})
  with pytest.raises(FileNotFoundError, match="nope.model"):
    runner.start(cfg, progress=False)
  assert not os.path.exists(cfg.store)


def test_batch_buckets_pad_each_call_to_its_phase_bucket():
  """Calls pad to the smallest bucket that holds them (every batch the sampler forms of them
  has that many rows), a call above every bucket to its power of two; a row's text does not
  depend on the padding. configs/sandbox.py sizes the buckets from the phases."""
  from stable_alignment_jax.sandbox.backends import Request, make_backend
  assert sandbox_config.phase_buckets(9, 4) == [16, 32, 64]  # 9 drafts, 18 scores, 36 ratings
  assert sandbox_config.phase_buckets(5, 3) == [8, 16]
  assert sandbox_config.get_config("tiny,agents=5").backends.local.batch_buckets == [8, 16, 32]

  def backend(buckets):
    return make_backend("local", ml_collections.ConfigDict(dict(
        kind="jax", model="random:tiny:0", dtype="float32", devices=1, min_batch=1,
        max_prompt_tokens=64, batch_buckets=buckets)), ["m"])

  with pytest.raises(ValueError, match=r"batch_buckets=\[4, 12\]: .* powers of two"):
    backend([12, 4])
  padded, plain = backend([4, 16]), backend([])
  rows = []
  sampler = padded.models["random:tiny:0"].sampler
  left_pad = sampler._left_pad
  sampler._left_pad = lambda prompts, *a, **k: rows.append(left_pad(prompts, *a, **k)[0].shape[0]
                                                           ) or left_pad(prompts, *a, **k)
  reqs = [Request("local", "m", f"question {i}?" * (1 + i % 3), 6, 0.7 * (i % 2), 0.9, i)
          for i in range(5)]
  assert padded.generate_sync(reqs[:3]) == plain.generate_sync(reqs[:3])
  assert padded.generate_sync(reqs) == plain.generate_sync(reqs)
  choice = [dataclasses.replace(r, prefix="Rating:", choices=tuple("1234567")) for r in reqs[:3]]
  got, want = padded.choose_sync(choice), plain.choose_sync(choice)
  assert np.allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert rows == [4, 16, 4], rows
  assert padded.counters["batch_rows"] == 4 + 16 + 4
