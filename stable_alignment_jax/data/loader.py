"""Alignment examples -> training batches (grain): tokenise, truncate, pad K, shuffle, shard, batch.

An example is `{"prompt", "responses", "ratings", ...}` (DESIGN.md "Alignment dataset"); a batch
is `tokens int32[b,K,T]`, `loss_mask float32[b,K,T]`, `ratings float32[b,K]`,
`response_mask float32[b,K]` with b = global batch / process count.

Row k of an example is `[BOS] + tokens(prompt + response_k) + [EOS]` (prompt and response
tokenised as one text; BOS only when the tokenizer adds one), right-padded with `pad_id`.
`prompt_format` (config `data.prompt_format`; the formats live in prompt_format.py): "alpaca"
takes the stored prompt (the paper's layout); "chat_template" renders the example's `turns`
(user, assistant, ..., user) with the tokenizer's chat template and generation prompt, and ends
each response with the template's end-of-turn token instead of EOS, so a chat model learns to
stop where it is served; "auto" (default) is chat_template when the tokenizer has one and the
examples carry `turns`, else alpaca. Datasets built before `turns` existed read as alpaca
only; empty `turns` (an HH dialogue that does not alternate) drop the example under
chat_template, counted.
`tokens[t]` is predicted from position t-1, so `loss_mask[t] = 1` exactly on response tokens and
the closing EOS / end of turn, never on BOS or prompt (a token straddling the boundary counts
as response: `PromptFormat.row_ids`). No target is cut silently: a response that does not fit
`max_len` whole is left out of its group, and an example left with none is dropped, unless
`data.truncation = "cut"` cuts it (marked in the batch's `cut`); data_lengths.py has the rules,
the counts every loader keeps (`stats["entries"]`) and the 5 % stop. An id outside the
tokenizer's vocabulary is an error.

With more than K responses, K are kept so that the contrast survives: rank them by rating
(stable, so among equal ratings the earlier one ranks first) and take K evenly spaced ranks from
the best to the worst (K=1: the best only). They keep their original order, so the loss's
"first best" tie rule still sees the same order. Taking the K highest instead would often keep
K equally rated answers of a question answered many times, and leave the loss nothing to rank.

Order: every epoch is a fresh permutation of the kept examples (numpy, seeded by (seed, epoch));
process i of n reads positions i, i+n, i+2n, ... of it, so processes read disjoint parts of every
epoch and all read the same number of examples (the last `len % n` of a permutation are skipped,
different ones each epoch). Batches may straddle epochs. The grain iterator's state is one
position, so a checkpointed iterator resumes exactly.

Mixtures (`config.data.mixture`, `open_mixture`): a stage can read several sources at fixed
weights, each with a kind (imitation, self_critic, ...). Every source keeps its own drop pre-pass,
epoch permutations and process sharding as above; grain's `MapDataset.mix` interleaves them by
weight deterministically (index i of the mix is a fixed pair of source and position), so
proportions hold exactly over every stretch of the stream and the iterator state is still one
position. Each example then carries `kind int32[b]`, the index of its source's kind in
`stats["kinds"]`, which the trainer uses to pick the loss per example.

Checkpointing with Orbax: the iterator (`it = iter(loader)`) is a `grain.DatasetIterator`;
save it as an item with `grain.checkpoint.CheckpointSave(it)` and restore into a fresh
`iter(loader)` with `grain.checkpoint.CheckpointRestore(it)` (handler: `grain.checkpoint.
CheckpointHandler`), or store `json.dumps(it.get_state())` yourself and call `it.set_state`.
"""

import collections
import dataclasses
import functools
import logging
import os
import sys
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from stable_alignment_jax.data import data_lengths, jsonl, preference_files, synthetic
from stable_alignment_jax.data.data_lengths import (  # noqa: F401
    DROP_NO_CHAT_TURNS, DROP_NO_RESPONSE_FITS, DROP_NO_RESPONSES, DROP_PROMPT_TOO_LONG)
from stable_alignment_jax.data.hindsight import chain_of_hindsight
from stable_alignment_jax.data.prompt_format import (PROMPT_FORMATS, PromptFormat, as_format, text,
                                                     resolve_prompt_format)

def drop_reason(ex: dict, tokenizer, *, max_len: int,
                prompt_format: "str | PromptFormat" = "alpaca",
                truncation: str = "drop") -> str | None:
  """Why `encode_example` would drop `ex` (one of the DROP_* names), or None if it keeps it."""
  return data_lengths.fit_example(ex, as_format(tokenizer, prompt_format), max_len,
                                  truncation).drop


def select_responses(ratings: Sequence[float], k: int) -> list[int]:
  """Indices of k responses spread over the rating ranks (best and worst included when k > 1),
  in their original order; all of them when there are at most k."""
  ratings = np.asarray(ratings, np.float64)
  n = len(ratings)
  if n <= k:
    return list(range(n))
  ranked = np.argsort(-ratings, kind="stable")  # best first; ties: earlier first
  if k == 1:
    return [int(ranked[0])]
  picks = {int(ranked[round(j * (n - 1) / (k - 1))]) for j in range(k)}
  return sorted(picks)


def encode_example(ex: dict, tokenizer, *, max_len: int, num_responses: int,
                   prompt_format: "str | PromptFormat" = "alpaca",
                   truncation: str = "drop") -> dict | None:
  """One example -> K token rows and masks; None when it must be dropped (see `drop_reason`).
  The K are chosen among the responses that fit (`select_responses`); with truncation="cut"
  the batch also carries `cut` float32[K], 1 on a row cut short (it holds no end token)."""
  fmt = as_format(tokenizer, prompt_format)
  responses, ratings = ex["responses"], ex["ratings"]
  if len(responses) != len(ratings):
    raise ValueError(f"example with prompt {text(ex['prompt'])[:60]!r}: {len(responses)} "
                     f"responses but {len(ratings)} ratings")
  fitted = data_lengths.fit_example(ex, fmt, max_len, truncation)
  if fitted.drop is not None:
    return None
  prompt = fitted.prompt
  k, t = num_responses, max_len
  tokens = np.full((k, t), tokenizer.pad_id, np.int32)
  loss_mask = np.zeros((k, t), np.float32)
  out_ratings = np.zeros((k,), np.float32)
  response_mask = np.zeros((k,), np.float32)
  cut = np.zeros((k,), np.float32)
  # Empty slots keep the prompt tokens (harmless, fully masked) so their rows are well formed.
  tokens[:, :len(prompt)] = prompt
  rows = fitted.rows
  for slot, j in enumerate(select_responses([ratings[i] for i, *_ in rows], k)):
    i, ids, n, was_cut = rows[j]
    tokens[slot, :] = tokenizer.pad_id
    tokens[slot, :len(ids)] = ids
    loss_mask[slot, n:len(ids)] = 1.0
    out_ratings[slot] = float(ratings[i])
    response_mask[slot] = 1.0
    cut[slot] = float(was_cut)
  data_lengths.check_ids(tokens, tokenizer.vocab_size, ex)
  out = {"tokens": tokens, "loss_mask": loss_mask, "ratings": out_ratings,
         "response_mask": response_mask}
  if truncation == "cut":
    out["cut"] = cut
  return out


class _ShardPositions:
  """Position j of this process's stream -> index into the kept-example list (see module doc)."""

  def __init__(self, num_kept: int, *, seed: int, shuffle: bool, num_epochs: int | None,
               shard_index: int, shard_count: int):
    self.per_epoch = num_kept // shard_count
    self.num_kept, self.seed, self.shuffle = num_kept, seed, shuffle
    self.shard_index, self.shard_count = shard_index, shard_count
    self.length = sys.maxsize if num_epochs is None else self.per_epoch * num_epochs

  def __len__(self) -> int:
    return self.length

  @functools.lru_cache(maxsize=4)
  def _perm(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_kept)
    return np.random.default_rng([*np.atleast_1d(self.seed).tolist(), epoch]).permutation(
        self.num_kept)

  def __getitem__(self, j: int) -> int:
    if not 0 <= j < self.length:
      raise IndexError(j)
    epoch, pos = divmod(int(j), self.per_epoch)
    return int(self._perm(epoch)[pos * self.shard_count + self.shard_index])


@dataclasses.dataclass
class _Encode(grain.transforms.Map):
  """Picklable (for worker processes): reads example `kept[i]` from the source and encodes it."""
  source: Any
  kept: np.ndarray
  tokenizer: Any
  max_len: int
  num_responses: int
  prompt_format: Any = "alpaca"
  kind: int | None = None  # the mixture entry's kind index, written as `kind` int32 when set
  truncation: str = "drop"

  def map(self, i: int) -> dict:
    ex = self.source[int(self.kept[i])]
    out = encode_example(ex, self.tokenizer, max_len=self.max_len,
                         num_responses=self.num_responses, prompt_format=self.prompt_format,
                         truncation=self.truncation)
    if out is None:  # the pre-pass kept it, so the source or tokenizer changed under us
      raise RuntimeError(f"example {int(self.kept[i])} passed the length pre-pass but not encoding")
    if self.kind is not None:
      out["kind"] = np.int32(self.kind)
    return out


class AlignmentLoader:
  """`iter(loader)` -> a grain DatasetIterator of batches (get_state/set_state for resume).

  `stats`: examples, kept, dropped (by reason), examples_per_epoch (this process),
  batches_per_epoch (this process, fractional when batches straddle epochs), batch_size.
  """

  def __init__(self, dataset: grain.IterDataset, stats: dict):
    self.dataset, self.stats = dataset, stats

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.dataset)


def _process_index_count() -> tuple[int, int]:
  import jax  # only when the caller did not say: keeps data tests free of jax start-up
  return jax.process_index(), jax.process_count()


def _iter_source(source, chunk: int = 1024):
  """Every example in order, read in bulk when the source can (array_record reads in parallel)."""
  if not hasattr(source, "__getitems__"):
    yield from (source[i] for i in range(len(source)))
    return
  for start in range(0, len(source), chunk):
    yield from source.__getitems__(list(range(start, min(start + chunk, len(source)))))


def read_jsonl(path: str) -> list[dict]:
  """Examples of the alignment contract, one JSON object a line ({prompt, responses, ratings}
  required; `turns`, the prompt as chat turns, optional); a bad line is an error naming the
  file, line and field."""
  out = []
  for n, ex in jsonl.records(path):
    if not isinstance(ex, dict) or not isinstance(ex.get("prompt"), str):
      raise ValueError(f"{path}:{n}: field 'prompt' must be a string")
    resp, rat = ex.get("responses"), ex.get("ratings")
    if not isinstance(resp, list) or not resp or not all(isinstance(r, str) for r in resp):
      raise ValueError(f"{path}:{n}: field 'responses' must be a non-empty list of strings")
    if (not isinstance(rat, list) or len(rat) != len(resp)
        or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rat)):
      raise ValueError(f"{path}:{n}: field 'ratings' must be {len(resp)} numbers, one per "
                       "response")
    turns = ex.get("turns", [])
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns) or (
        turns and len(turns) % 2 == 0):
      raise ValueError(f"{path}:{n}: field 'turns' must be a list of strings: user, assistant, "
                       "..., user (an odd number)")
    out.append(ex)
  if not out:
    raise ValueError(f"{path}: no examples")
  return out


@dataclasses.dataclass(frozen=True)
class Mixture:
  """Weighted sources, each with a kind (`config.data.mixture`; module doc "Mixtures").

  `entries`: (kind, source, weight) in a fixed order; `epoch_entry`: the index of the entry an
  epoch is counted on (the stage's own data), or None to count the whole mixture; `datasets`:
  each entry's dataset name, for messages (empty: unnamed)."""
  entries: tuple
  epoch_entry: int | None = 0
  datasets: tuple = ()

  @property
  def kinds(self) -> list[str]:
    return list(dict.fromkeys(kind for kind, _, _ in self.entries))


def _kept_examples(source, max_len: int, fmt, truncation: str
                   ) -> tuple[np.ndarray, data_lengths.Counts, int]:
  """The pre-pass: indices of the examples `encode_example` keeps, their counts (drops, left
  out, cut, lengths: data_lengths.Counts), and the fewest tokens every row of a kept example
  shares (0 when none is kept)."""
  counts = data_lengths.Counts()
  kept, shortest = [], None
  for i, ex in enumerate(_iter_source(source)):
    f = data_lengths.fit_example(ex, fmt, max_len, truncation)
    counts.add(f, len(ex["responses"]))
    if f.drop is None:
      kept.append(i)
      shortest = f.shared if shortest is None else min(shortest, f.shared)
  return np.asarray(kept, np.int64), counts, shortest or 0


def make_loader(source, tokenizer, *, global_batch_size: int, max_len: int, num_responses: int,
                seed: int, shuffle: bool = True, num_epochs: int | None = None,
                shard_index: int | None = None, shard_count: int | None = None,
                worker_count: int = 0, drop_remainder: bool = True,
                prompt_format: str = "auto", truncation: str = "drop") -> AlignmentLoader:
  """A grain pipeline over any random-access `source` of example dicts (list, tfds.data_source),
  or over a `Mixture` of them (then every example carries `kind`, its entry's index in
  `Mixture.kinds`).

  A pre-pass tokenises every prompt once to find the examples to drop, so the drop counts are
  exact and known before training, and every process sees the same epoch length.
  `prompt_format`: auto | alpaca | chat_template (`config.data.prompt_format`; module doc).
  `truncation`: drop | cut (`config.data.truncation`; data_lengths.py). `stats["entries"]` holds
  each entry's counts and lengths; the trainers pass them to `data_lengths.check_loss`.
  """
  if truncation not in data_lengths.TRUNCATIONS:
    raise ValueError(f"data.truncation={truncation!r}: expected one of "
                     f"{data_lengths.TRUNCATIONS}")
  if shard_index is None or shard_count is None:
    shard_index, shard_count = _process_index_count()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  if global_batch_size % shard_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the "
                     f"{shard_count} processes")
  batch = global_batch_size // shard_count
  mixture = source if isinstance(source, Mixture) else None
  entries = mixture.entries if mixture else (("", source, 1.0),)
  kinds = mixture.kinds if mixture else []
  first = next((src[0] for _, src, _ in entries if len(src)), None)
  fmt = PromptFormat(tokenizer, resolve_prompt_format(prompt_format, tokenizer, first))
  parts, per_entry = [], []
  names = (mixture.datasets if mixture else ()) or ("",) * len(entries)
  for j, (kind, src, weight) in enumerate(entries):
    kept, counts, shortest = _kept_examples(src, max_len, fmt, truncation)
    dropped = counts.dropped
    where = f"mixture entry {kind!r}: " if mixture else ""
    if len(kept) < shard_count:
      raise ValueError(f"{where}only {len(kept)} of {len(src)} examples fit max_len={max_len} "
                       f"(dropped: {dropped}); need at least one per process ({shard_count})")
    if dropped:
      logging.warning("data: %sdropped %d of %d examples (%s) at max_len=%d", where,
                      sum(dropped.values()), len(src), dropped, max_len)
    # Component 0 keeps the plain seed, so a one-entry mixture reads in the order of its source.
    positions = _ShardPositions(len(kept), seed=seed if j == 0 else (seed, j), shuffle=shuffle,
                                num_epochs=num_epochs, shard_index=shard_index,
                                shard_count=shard_count)
    parts.append(grain.MapDataset.source(positions).map(_Encode(
        src, kept, tokenizer, max_len, num_responses, fmt,
        kinds.index(kind) if mixture else None, truncation)))
    per_entry.append({"kind": kind, "dataset": names[j], "weight": float(weight),
                      **counts.summary(), "kept": int(len(kept)), "min_prompt_len": shortest,
                      "examples_per_epoch": positions.per_epoch})
  if mixture:
    # Positional and deterministic: index i of the mix is a fixed (entry, position) pair, so
    # the iterator's one-position state resumes a mixture exactly, like a single source.
    weights = [e["weight"] for e in per_entry]
    ds = grain.MapDataset.mix(parts, weights)
    share = np.asarray(weights) / sum(weights)
    if mixture.epoch_entry is None:
      per_epoch = sum(e["examples_per_epoch"] for e in per_entry)
    else:
      per_epoch = per_entry[mixture.epoch_entry]["examples_per_epoch"] / share[mixture.epoch_entry]
  else:
    ds, per_epoch = parts[0], per_entry[0]["examples_per_epoch"]
  if num_epochs is not None and drop_remainder and len(ds) < batch:
    raise ValueError(f"{len(ds)} examples per process in {num_epochs} epoch(s) make no "
                     f"full batch of {batch}")
  ds = ds.to_iter_dataset().batch(batch, drop_remainder=drop_remainder)
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  stats = {"examples": sum(e["examples"] for e in per_entry),
           "kept": sum(e["kept"] for e in per_entry),
           "dropped": dict(sum((collections.Counter(e["dropped"]) for e in per_entry),
                               collections.Counter())),
           "prompt_format": fmt.name, "truncation": truncation, "max_len": max_len,
           "examples_per_epoch": per_epoch, "batch_size": batch,
           # every row of every batch starts with at least this many prompt tokens, the same
           # in all K rows of an example (train.shared_prefix = -1 shares them)
           "min_prompt_len": min(e["min_prompt_len"] for e in per_entry),
           "batches_per_epoch": per_epoch / batch}
  # Examples an epoch holds over all processes (train.epochs counts these).
  stats["epoch_examples"] = (per_epoch * shard_count if mixture else stats["kept"])
  stats["entries"] = per_entry
  if mixture:
    stats["kinds"] = kinds
    stats["mixture"] = per_entry
  return AlignmentLoader(ds, stats)


class TfdsSource:
  """`tfds.data_source` in raw-bytes mode plus a direct parse of its flat tf.train.Example.

  tfds's own numpy decoder costs ~0.7 ms per example; parsing the proto ourselves is several
  times faster. Text features come back as `str`, sequences of text as `list[str]`, numeric
  sequences as numpy arrays. Random access, picklable, `__getitems__` for bulk reads.
  """

  def __init__(self, raw):
    import tensorflow_datasets as tfds
    self.raw = raw
    feats = raw.dataset_info.features
    self.sequences = {k for k, f in feats.items() if isinstance(f, tfds.features.Sequence)}
    self.dtypes = {k: np.dtype(feats[k].feature.np_dtype) for k in self.sequences
                   if not isinstance(feats[k].feature, tfds.features.Text)}

  def __len__(self) -> int:
    return len(self.raw)

  def _decode(self, record: bytes) -> dict:
    from tensorflow_datasets.proto import tf_example_pb2
    out = {}
    for name, feat in tf_example_pb2.Example.FromString(record).features.feature.items():
      kind = feat.WhichOneof("kind")
      values = getattr(feat, kind).value if kind else []
      if name in self.dtypes:
        out[name] = np.asarray(values, self.dtypes[name])
      elif kind == "bytes_list":
        texts = [v.decode("utf-8") for v in values]
        out[name] = texts if name in self.sequences else texts[0]
      else:
        out[name] = np.asarray(values) if name in self.sequences else values[0]
    return out

  def __getitem__(self, i: int) -> dict:
    if not -len(self) <= i < len(self):  # array_record raises ValueError; iteration needs this
      raise IndexError(f"example {i} of {len(self)}")
    return self._decode(self.raw[i % len(self)])

  def __iter__(self):
    return _iter_source(self)

  def __getitems__(self, keys: Sequence[int]) -> list[dict]:
    return [self._decode(r) for r in self.raw.__getitems__(list(keys))]


def open_tfds(name: str, data_dir: str, split: str) -> TfdsSource:
  """A prepared array_record TFDS dataset as a random-access source of example dicts; no TF.

  `name` is e.g. `sandbox_alignment/imitation` (optionally `:1.0.0`); the builder code need not
  be imported: tfds reads the features and split files from the stored metadata.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import decode
  return TfdsSource(tfds.data_source(name, data_dir=data_dir, split=split, download=False,
                                     deserialize_method=decode.DeserializeMethod.RAW_BYTES))


# --- the sources a config names -----------------------------------------------------------

def open_source(dc, split: str, seed: int):
  """The random-access example source of a split as config.data names it (`dc.source`): TFDS
  array_record, `{data_dir}/{split}.jsonl`, or the embedded synthetic set; Chain-of-Hindsight
  applied per example when `dc.chain_of_hindsight`."""
  if dc.source == "synthetic":
    n = dc.synthetic_examples
    if split == dc.train_split:
      src = synthetic.examples(n, seed=seed, num_responses=max(dc.num_responses, 2))
    else:  # held-out topics
      src = synthetic.examples(max(n // 8, 8), seed=seed + 1, start=n,
                               num_responses=max(dc.num_responses, 2))
  elif dc.source == "tfds":
    src = open_tfds(dc.dataset, os.path.expanduser(dc.data_dir), split)
  elif dc.source == "jsonl":  # {data_dir}/{split}.jsonl in the alignment-dataset contract
    src = read_jsonl(os.path.join(os.path.expanduser(dc.data_dir), f"{split}.jsonl"))
  elif dc.source == "trl":  # TRL's standard formats: file or hub id in data.dataset
    src = preference_files.open_standard(dc.dataset, split, train_split=dc.train_split,
                                         bad_rows=dc.get("bad_rows", "skip"))
  else:
    raise ValueError(f"data.source={dc.source!r}; expected tfds, jsonl, trl or synthetic")
  if dc.chain_of_hindsight:
    src = _Mapped(src, seed)
  return src


def kind_of(dc) -> str:
  """The kind of a single-source stage's examples: the TFDS config name of `data.dataset`
  (`sandbox_alignment/self_critic:1.1.0` -> `self_critic`), else the source name."""
  if dc.source == "tfds" and "/" in dc.dataset:
    return dc.dataset.split("/")[-1].split(":")[0]
  return dc.source


def open_mixture(dc, split: str, seed: int) -> Mixture:
  """`config.data` as a `Mixture`: its `mixture` entries (name -> {weight, dataset, split,
  source, data_dir, kind}; each missing key is taken from `config.data`, `kind` from the name),
  or one entry, `data.dataset` itself, when `mixture` is empty. Entries of weight 0 are left out.
  Entries go in name order (ConfigDict keys are sorted); the epoch is counted on the entry whose
  dataset is `data.dataset` (the stage's own data), or on the whole mixture when none is.
  `split` is the train split: the eval split of a mixture is the stage's own data alone."""
  mix = dc.get("mixture") or {}
  if not mix or split != dc.train_split:
    return Mixture(((kind_of(dc), open_source(dc, split, seed), 1.0),),
                   datasets=(_dataset_name(dc, split),))
  same = lambda x: (x.source, x.dataset, x.data_dir, x.train_split)
  entries, epoch_entry, datasets = [], None, []
  for name in sorted(mix):
    e = dict(mix[name])
    unknown = set(e) - {"weight", "dataset", "split", "source", "data_dir", "kind"}
    if unknown:
      raise ValueError(f"config.data.mixture.{name}: unknown keys {sorted(unknown)}")
    weight = float(e.pop("weight", 1.0))
    if weight < 0:
      raise ValueError(f"config.data.mixture.{name}.weight={weight}: must be >= 0")
    if weight == 0:
      continue
    sub = ml_collections.ConfigDict(dc.to_dict())
    sub.mixture = {}
    sub.train_split = e.pop("split", dc.train_split)
    kind = e.pop("kind", name)
    for k, v in e.items():
      sub[k] = v
    if epoch_entry is None and same(sub) == same(dc):
      epoch_entry = len(entries)
    try:
      src = open_source(sub, sub.train_split, seed)
    except Exception as err:
      raise type(err)(f"config.data.mixture.{name} ({sub.dataset}, split "
                      f"{sub.train_split}): {err}") from err
    entries.append((kind, src, weight))
    datasets.append(_dataset_name(sub, sub.train_split))
  if not entries:
    raise ValueError("config.data.mixture: every entry has weight 0")
  return Mixture(tuple(entries), epoch_entry, tuple(datasets))


def _dataset_name(dc, split: str) -> str:
  """How messages name a source: the TFDS name, the jsonl file, or the embedded set."""
  if dc.source == "tfds":
    return f"{dc.dataset} ({split})"
  if dc.source == "jsonl":
    return os.path.join(os.path.expanduser(dc.data_dir), f"{split}.jsonl")
  return f"{dc.source} ({split})"


class _Mapped:
  """A random-access source with Chain-of-Hindsight applied per example (deterministic per index)."""

  def __init__(self, source, seed):
    self.source, self.seed = source, seed

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return chain_of_hindsight(self.source[i], np.random.default_rng([self.seed, i]))
