"""The grain pipeline: exact token rows and masks, K selection, drops, shuffling, sharding, resume."""

import json

import grain
import numpy as np
import pytest

from stable_alignment_jax.data import loader as data
from stable_alignment_jax.data.tokenizer import load_tokenizer

BYTE = load_tokenizer("byte")


def _ids(text):  # ByteTokenizer ids computed independently of the tokenizer class
  return [b + 3 for b in text.encode("utf-8")]


def _examples(n, n_resp=2):
  # Rating of response 0 is the example's number, so a batch says which examples it holds.
  return [{"prompt": f"question {i}?", "responses": [f"answer {i}"] + ["other"] * (n_resp - 1),
           "ratings": [float(i)] + [-1.0] * (n_resp - 1)} for i in range(n)]


def _ids_of(batch):
  return [int(r) for r in batch["ratings"][:, 0]]


def test_encode_example_rows_and_masks_by_hand():
  ex = {"prompt": b"Hi", "responses": ["yo", "hey"], "ratings": [3.0, 5.0]}
  out = data.encode_example(ex, BYTE, max_len=8, num_responses=3)
  p = [1] + _ids("Hi")
  want_tokens = np.array([p + _ids("yo") + [2, 0, 0], p + _ids("hey") + [2, 0], p + [0] * 5])
  np.testing.assert_array_equal(out["tokens"], want_tokens)
  want_mask = np.array([[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 0], [0] * 8])
  np.testing.assert_array_equal(out["loss_mask"], want_mask)
  np.testing.assert_array_equal(out["ratings"], [3.0, 5.0, 0.0])
  np.testing.assert_array_equal(out["response_mask"], [1, 1, 0])
  assert out["tokens"].dtype == np.int32 and out["loss_mask"].dtype == np.float32


def test_response_one_token_too_long_is_left_out_and_counted_not_cut():
  # BOS + "abc" + "defgh" + EOS = 10 tokens: at max_len 9 the response misses by its EOS alone.
  ex = {"prompt": "abc", "responses": ["defgh", "de"], "ratings": [1.0, 2.0]}
  out = data.encode_example(ex, BYTE, max_len=9, num_responses=2)
  np.testing.assert_array_equal(out["tokens"][0], [1] + _ids("abcde") + [2, 0, 0])
  np.testing.assert_array_equal(out["response_mask"], [1, 0])  # only "de" is left
  np.testing.assert_array_equal(out["ratings"], [2.0, 0.0])
  assert "cut" not in out
  # At 10 it fits whole, EOS included.
  whole = data.encode_example(ex, BYTE, max_len=10, num_responses=2)
  np.testing.assert_array_equal(whole["tokens"][0], [1] + _ids("abcdefgh") + [2])
  # With no response left the example is dropped; a prompt with no room is dropped as before.
  alone = {"prompt": "abc", "responses": ["defgh"], "ratings": [1.0]}
  assert data.encode_example(alone, BYTE, max_len=9, num_responses=1) is None
  assert data.drop_reason(alone, BYTE, max_len=9) == data.DROP_NO_RESPONSE_FITS
  assert data.drop_reason(alone, BYTE, max_len=4) == data.DROP_PROMPT_TOO_LONG
  # The loader counts both: one response left out, one example dropped.
  loader = data.make_loader([ex, alone, {"prompt": "x", "responses": ["y"], "ratings": [0.0]}],
                            BYTE, global_batch_size=1, max_len=9, num_responses=2, seed=0,
                            shard_index=0, shard_count=1)
  entry = loader.stats["entries"][0]
  assert entry["examples"] == 3 and entry["kept"] == 2 and entry["responses"] == 4
  assert entry["dropped"] == {data.DROP_NO_RESPONSE_FITS: 1}
  assert entry["responses_left_out"] == 2 and entry["responses_cut"] == 0
  assert entry["max_len_for_99"] == 10  # the longest row, "abc"+"defgh" with BOS and EOS
  empty = {"prompt": "abc", "responses": [], "ratings": []}
  assert data.encode_example(empty, BYTE, max_len=9, num_responses=1) is None
  assert data.drop_reason(empty, BYTE, max_len=9) == data.DROP_NO_RESPONSES
  with pytest.raises(ValueError, match="2 responses but 1 ratings"):
    data.encode_example({"prompt": "q", "responses": ["a", "b"], "ratings": [1.0]}, BYTE,
                        max_len=9, num_responses=2)


def test_truncation_cut_keeps_the_old_cut_and_marks_the_row():
  ex = {"prompt": "abc", "responses": ["defgh", "d"], "ratings": [1.0, 2.0]}
  out = data.encode_example(ex, BYTE, max_len=6, num_responses=2, truncation="cut")
  # BOS + 3 prompt tokens leave 2 places: "de", and no EOS, because the response was cut.
  np.testing.assert_array_equal(out["tokens"][0], [1] + _ids("abcde"))
  np.testing.assert_array_equal(out["loss_mask"][0], [0, 0, 0, 0, 1, 1])
  np.testing.assert_array_equal(out["tokens"][1], [1] + _ids("abcd") + [2])  # whole, with EOS
  np.testing.assert_array_equal(out["cut"], [1.0, 0.0])
  # Exactly one free position is enough; none is a drop.
  assert data.encode_example(ex, BYTE, max_len=5, num_responses=1,
                             truncation="cut")["loss_mask"].sum() == 1
  assert data.encode_example(ex, BYTE, max_len=4, num_responses=1, truncation="cut") is None
  loader = data.make_loader([ex], BYTE, global_batch_size=1, max_len=6, num_responses=2, seed=0,
                            shard_index=0, shard_count=1, truncation="cut")
  assert loader.stats["entries"][0]["responses_cut"] == 1
  np.testing.assert_array_equal(next(iter(loader))["cut"], [[1.0, 0.0]])
  with pytest.raises(ValueError, match="data.truncation='chop'"):
    data.make_loader([ex], BYTE, global_batch_size=1, max_len=6, num_responses=2, seed=0,
                     shard_index=0, shard_count=1, truncation="chop")


def test_more_than_k_keeps_a_spread_of_ratings_in_original_order():
  # Worked by hand: rank by rating (stable), take ranks 0, (n-1)/(k-1), ..., n-1.
  assert data.select_responses([1, 5, 3, 5, 2], 3) == [0, 1, 2]  # ranks 0, 2, 4 = idx 1, 2, 0
  assert data.select_responses([1, 2, 3, 4, 5, 6, 7], 3) == [0, 3, 6]
  assert data.select_responses([4, 4, 4, 4], 2) == [0, 3]  # ties: earlier ranks first
  assert data.select_responses([3, 7, 7], 1) == [1]  # first best
  assert data.select_responses([2, 1], 5) == [0, 1]
  # Seven answers rated 7 and one rated 1: the top-2 would be two 7s; the spread keeps the 1.
  assert data.select_responses([7, 7, 7, 1, 7, 7, 7, 7], 2) == [0, 3]
  ex = {"prompt": "q", "responses": ["a", "b", "c", "d"], "ratings": [1.0, 7.0, 3.0, 7.0]}
  out = data.encode_example(ex, BYTE, max_len=6, num_responses=2)
  np.testing.assert_array_equal(out["ratings"], [1.0, 7.0])
  mask = out["loss_mask"].astype(bool)
  assert [BYTE.decode(row[m]) for row, m in zip(out["tokens"], mask)] == ["a", "b"]


def test_tokens_decode_back_with_llama_sentencepiece(shared_data):
  tok = load_tokenizer(str(shared_data / "tokenizers" / "llama2_tokenizer.model"))
  ex = {"prompt": "### Instruction:\nIs it ok to lie?\n\n### Response:\n",
        "responses": ["No, honesty matters.", "Sometimes, é ü 你好."], "ratings": [6.0, 2.0]}
  out = data.encode_example(ex, tok, max_len=64, num_responses=3)
  for k, resp in enumerate(ex["responses"]):
    row, mask = out["tokens"][k], out["loss_mask"][k].astype(bool)
    start = int(np.argmax(mask))
    assert row[0] == tok.bos_id and row[mask][-1] == tok.eos_id
    assert tok.decode(row[1:start]) == ex["prompt"]
    assert tok.decode(row[mask][:-1]) == resp


def test_one_epoch_reads_every_kept_example_once_and_counts_drops():
  src = _examples(24) + [{"prompt": "x" * 100, "responses": ["a"], "ratings": [1.0]},
                         {"prompt": "q", "responses": [], "ratings": []}]
  loader = data.make_loader(src, BYTE, global_batch_size=4, max_len=32, num_responses=2, seed=3,
                            num_epochs=1, shard_index=0, shard_count=1)
  assert loader.stats["dropped"] == {"prompt_too_long": 1, "no_responses": 1}
  assert loader.stats["kept"] == 24 and loader.stats["batches_per_epoch"] == 6
  batches = list(loader)
  assert len(batches) == 6
  seen = [i for b in batches for i in _ids_of(b)]
  assert sorted(seen) == list(range(24)) and seen != list(range(24))  # all once, shuffled
  b = batches[0]
  assert b["tokens"].shape == (4, 2, 32) and b["response_mask"].shape == (4, 2)
  for row, i in zip(b["tokens"][:, 0], _ids_of(b)):
    assert BYTE.decode(row) == f"question {i}?answer {i}"


def test_unshuffled_order_and_reshuffle_per_epoch():
  loader = data.make_loader(_examples(8), BYTE, global_batch_size=4, max_len=32, num_responses=2,
                            seed=0, shuffle=False, num_epochs=2, shard_index=0, shard_count=1)
  assert [i for b in loader for i in _ids_of(b)] == list(range(8)) * 2
  loader = data.make_loader(_examples(8), BYTE, global_batch_size=8, max_len=32, num_responses=2,
                            seed=0, num_epochs=2, shard_index=0, shard_count=1)
  e1, e2 = [_ids_of(b) for b in loader]
  assert sorted(e1) == sorted(e2) == list(range(8)) and e1 != e2


def test_two_processes_read_disjoint_halves_of_every_epoch():
  n = 21  # odd: one example per epoch is left out, a different one each epoch
  per_proc = []
  for shard in (0, 1):
    loader = data.make_loader(_examples(n), BYTE, global_batch_size=4, max_len=32,
                              num_responses=2, seed=7, num_epochs=3, shard_index=shard,
                              shard_count=2)
    assert loader.stats["examples_per_epoch"] == 10 and loader.stats["batch_size"] == 2
    per_proc.append([i for b in loader for i in _ids_of(b)])
  assert len(per_proc[0]) == len(per_proc[1]) == 30
  left_out = []
  for e in range(3):
    a, b = (set(p[10 * e:10 * (e + 1)]) for p in per_proc)
    assert len(a) == len(b) == 10 and not a & b
    left_out.append(set(range(n)) - a - b)
  assert all(len(s) == 1 for s in left_out) and len(set.union(*left_out)) > 1
  with pytest.raises(ValueError, match="not divisible"):
    data.make_loader(_examples(8), BYTE, global_batch_size=3, max_len=32, num_responses=2,
                     seed=0, shard_index=0, shard_count=2)


def _batches_equal(xs, ys):
  return len(xs) == len(ys) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(xs, ys))


def test_resume_from_state_yields_the_same_following_batches():
  loader = data.make_loader(_examples(30), BYTE, global_batch_size=4, max_len=32,
                            num_responses=2, seed=1, shard_index=0, shard_count=1)
  it = iter(loader)
  for _ in range(9):  # past the first epoch boundary (7.5 batches per epoch)
    next(it)
  state = json.dumps(it.get_state())
  want = [next(it) for _ in range(5)]
  fresh = iter(loader)
  fresh.set_state(json.loads(state))
  assert _batches_equal([next(fresh) for _ in range(5)], want)
  # And a different position really gives different batches (the check can fail).
  other = iter(loader)
  assert not _batches_equal([next(other) for _ in range(5)], want)


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  loader = data.make_loader(_examples(30), BYTE, global_batch_size=4, max_len=32,
                            num_responses=2, seed=1, shard_index=0, shard_count=1)
  it = iter(loader)
  for _ in range(5):
    next(it)
  mgr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",))
  mgr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  mgr.wait_until_finished()
  want = [next(it) for _ in range(4)]
  restored = mgr.restore(5, args=ocp.args.Composite(
      data_iter=grain.checkpoint.CheckpointRestore(iter(loader))))["data_iter"]
  assert _batches_equal([next(restored) for _ in range(4)], want)
  mgr.close()


def test_worker_processes_give_the_same_batches():
  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain's worker options are absl flags (main.py parses them)
    flags.FLAGS.mark_as_parsed()
  kw = dict(global_batch_size=4, max_len=32, num_responses=2, seed=5, num_epochs=1,
            shard_index=0, shard_count=1)
  want = list(data.make_loader(_examples(16), BYTE, **kw))
  got = list(data.make_loader(_examples(16), BYTE, worker_count=1, **kw))
  assert _batches_equal(got, want)
