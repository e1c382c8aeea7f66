"""Tests for vlbpe_jax/data/pipeline.py: sharding, shuffling, packing, resume, text formats."""

import functools
import json
import os
import subprocess
import sys

import grain
from etils import epath
import numpy as np
from PIL import Image
import pytest

from vlbpe_jax.data import icl
from vlbpe_jax.data import pipeline as pl
from vlbpe_jax.data import shapes
from vlbpe_jax.data import tfds_builders as tb
from vlbpe_jax.data.text_tokenizer import TextTokenizer, example_texts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_LENGTHS = [3, 5, 2, 7, 4, 6, 2, 8, 2, 3, 5, 4, 6, 3]


def _tokens(record, rng):
  """Toy to_tokens: record i -> ids i*100 + (0..n-1), loss on even positions."""
  del rng
  n = _LENGTHS[record]
  return record * 100 + np.arange(n), np.arange(n) % 2 == 0


def _lm(**kw):
  args = dict(seq_len=8, batch_size=2, seed=3)
  return pl.lm_dataset(list(range(len(_LENGTHS))), _tokens, **{**args, **kw})


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_shard_slices_partition_evenly():
  slices = [pl.shard_slice(10, i, 3) for i in range(3)]
  assert [list(range(10))[s] for s in slices] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
  assert pl.shard_slice(10) == slice(0, 10)  # One jax process.
  with pytest.raises(ValueError, match="fewer than shard_count"):
    pl.shard_slice(2, 0, 3)
  with pytest.raises(ValueError, match="shard_index"):
    pl.shard_slice(10, 3, 3)


def test_dataset_shards_shuffles_and_reshuffles_each_epoch():
  src = list(range(12))
  hosts = [pl.dataset(src, lambda x, rng: np.int32(x), batch_size=2, seed=0, num_epochs=2,
                      shard=(i, 2)) for i in range(2)]
  per_host = [np.concatenate(list(ds)) for ds in hosts]
  for i, seen in enumerate(per_host):
    assert len(seen) == 12
    epoch1, epoch2 = seen[:6], seen[6:]
    assert sorted(epoch1) == sorted(epoch2) == list(range(6 * i, 6 * i + 6))
    assert not np.array_equal(epoch1, epoch2)  # Reshuffled (fixed seed: deterministic).
  assert not np.array_equal(per_host[0][:6], np.arange(6))
  again = np.concatenate(list(pl.dataset(src, lambda x, rng: np.int32(x), batch_size=2, seed=0,
                                         num_epochs=2, shard=(0, 2))))
  np.testing.assert_array_equal(again, per_host[0])
  other_seed = np.concatenate(list(pl.dataset(src, lambda x, rng: np.int32(x), batch_size=2,
                                              seed=1, num_epochs=2, shard=(0, 2))))
  assert not np.array_equal(other_seed, per_host[0])


def _ints(x, rng):
  del rng
  return np.int32(x)


def test_sharded_iterator_concatenates_fixed_shards_and_checks_the_batch():
  make = functools.partial(pl.dataset, list(range(16)), _ints, seed=0)
  it = pl.sharded_iterator(make, batch_size=8, data_shards=2)
  assert it.shard_names == ["shard_0-of-2", "shard_1-of-2"]
  halves = [iter(make(shard=(i, 2), batch_size=4)) for i in range(2)]
  for _ in range(3):  # crosses an epoch of each 8-row shard
    np.testing.assert_array_equal(next(it), np.concatenate([next(h) for h in halves]))
  # data_shards=0 in one process: one shard, the batches of the unsharded dataset.
  plain = iter(pl.dataset(list(range(16)), _ints, batch_size=8, seed=0))
  one = pl.sharded_iterator(make, batch_size=8)
  assert one.shard_names == ["shard_0-of-1"]
  for _ in range(3):
    np.testing.assert_array_equal(next(one), next(plain))
  with pytest.raises(ValueError, match=r"clip.batch_size=6 does not split over 4 data shards "
                     r"\(clip.data_shards=4\)"):
    pl.sharded_iterator(make, batch_size=6, data_shards=4, section="clip")


def test_dataset_drops_remainder_and_no_shuffle_keeps_order():
  batches = list(pl.dataset(list(range(7)), batch_size=3, seed=0, shuffle=False, num_epochs=1))
  assert [b.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("pack", [True, False])
def test_lm_batches_are_consistent(pack):
  batches = list(_lm(pack=pack, num_epochs=1, shuffle=False))
  seen = set()
  for b in batches:
    assert set(b) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    for k, v in b.items():
      assert v.shape == (2, 8), k
    assert b["loss_mask"].dtype == np.bool_ and b["inputs"].dtype == np.int32
    for row in range(2):
      seg = b["segment_ids"][row]
      assert not b["loss_mask"][row][seg == 0].any()
      for s in set(seg[seg > 0].tolist()):
        sel = seg == s
        ids = b["inputs"][row][sel]
        record, n = ids[0] // 100, sel.sum()
        seen.add(int(record))
        np.testing.assert_array_equal(ids, record * 100 + np.arange(n))
        np.testing.assert_array_equal(b["targets"][row][sel], record * 100 + 1 + np.arange(n))
        np.testing.assert_array_equal(b["positions"][row][sel], np.arange(n))
        np.testing.assert_array_equal(b["loss_mask"][row][sel], np.arange(1, n + 1) % 2 == 0)
  if pack:  # Packing fits more than one example in some rows.
    assert max(b["segment_ids"].max() for b in batches) >= 2
  else:
    assert len(seen) == 2 * len(batches) and max(b["segment_ids"].max() for b in batches) == 1


@pytest.mark.parametrize("pack", [True, False])
def test_resume_matches_uninterrupted_run_across_epochs(pack, tmp_path):
  ds = _lm(pack=pack)  # Shuffled, repeated forever.
  reference = _take(iter(ds), 16)  # ~4 epochs of 14 examples.
  it = iter(ds)
  _take(it, 9)
  state = it.get_state()
  # Through grain's orbax handler, as vlbpe_jax.checkpoint saves it.
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
  resumed = handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(
      iter(ds)))
  _assert_same(_take(resumed, 7), reference[9:])
  fresh = iter(ds)
  fresh.set_state(state)
  _assert_same(_take(fresh, 7), reference[9:])


def test_lm_errors():
  with pytest.raises(ValueError, match="seq_len"):
    _lm(seq_len=0)
  with pytest.raises(ValueError, match="batch_size"):
    _lm(batch_size=0)
  with pytest.raises(ValueError, match="worker_count"):
    _lm(worker_count=-1)
  with pytest.raises(ValueError, match="num_epochs"):
    _lm(num_epochs=0)
  with pytest.raises(ValueError, match="non-empty"):
    pl.lm_dataset([], _tokens, seq_len=8, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="9 tokens > seq_len"):
    list(pl.lm_dataset([0], lambda r, rng: (np.arange(9), np.ones(9, bool)), seq_len=7,
                       batch_size=1, seed=0, num_epochs=1))
  (b,) = list(pl.lm_dataset([0], lambda r, rng: (np.arange(9), np.ones(9, bool)), seq_len=7,
                            batch_size=1, seed=0, num_epochs=1, truncate=True, pack=False))
  np.testing.assert_array_equal(b["targets"][0], np.arange(1, 8))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = []
  for i in range(150):
    texts += example_texts(shapes.make_example(i, "train", resolution=32))
  return TextTokenizer.train(texts, vocab_size=400,
                             model_path=tmp_path_factory.mktemp("tok") / "t.model")


def _spans(tok, ids, mask):
  """Decoded text of the loss-masked spans."""
  out, cur = [], []
  for i, m in zip(ids, mask):
    if m:
      cur.append(i)
    elif cur:
      out.append(tok.decode(cur))
      cur = []
  return out + ([tok.decode(cur)] if cur else [])


def test_format_vqa_and_dialogue_mask_only_answers(tok):
  ex = shapes.make_example(4, "validation", resolution=32)
  ids, mask = pl.format_example(ex, "vqa", tok)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.dtype == np.int32
  assert _spans(tok, ids, mask) == [qa["a"] for qa in ex["qa"]]
  assert (ids == tok.user_id).sum() == (ids == tok.assistant_id).sum() == len(ex["qa"])
  assert tok.decode(ids) == " ".join(qa["q"] + " " + qa["a"] for qa in ex["qa"])
  ids, mask = pl.format_example(ex, "dialogue", tok)
  gpt = [t["value"] for t in ex["dialogue"] if t["from"] == "gpt"]
  assert _spans(tok, ids, mask) == gpt
  assert mask[ids == tok.eos_id].all() and (ids == tok.eos_id).sum() == len(gpt)


def test_format_vqa_keeps_the_asked_number_of_questions(tok):
  """`questions=k`: k of the image's QA pairs, drawn by the rng; the others' answers (which name
  colours and shapes a later question asks about) are not in the sequence."""
  ex = shapes.make_example(4, "validation", resolution=32)
  pairs = {(qa["q"], qa["a"]) for qa in ex["qa"]}
  assert len(pairs) >= 5
  kept = set()
  for seed in range(20):
    ids, mask = pl.format_example(ex, "vqa", tok, rng=np.random.default_rng(seed), questions=2)
    assert (ids == tok.user_id).sum() == (ids == tok.assistant_id).sum() == 2
    text = tok.decode(ids)
    asked = [(q, a) for q, a in pairs if q in text]
    assert len(asked) == 2 and _spans(tok, ids, mask) == [
        a for _, a in sorted(asked, key=lambda p: text.index(p[0]))]
    kept.update(asked)
  assert kept == pairs  # every question gets drawn
  ids, _ = pl.format_example(ex, "vqa", tok, rng=np.random.default_rng(0), questions=99)
  assert (ids == tok.user_id).sum() == len(ex["qa"])
  ids, _ = pl.format_example(ex, "vqa", tok, rng=np.random.default_rng(0), questions=0)
  assert (ids == tok.user_id).sum() == len(ex["qa"])
  with pytest.raises(ValueError, match="questions=2: expected an rng"):
    pl.format_example(ex, "vqa", tok, questions=2)
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match=f"questions={bad!r}"):
      pl.format_example(ex, "vqa", tok, rng=np.random.default_rng(0), questions=bad)
    with pytest.raises(ValueError, match=f"questions={bad!r}"):
      pl.TaskFormatter(tok, ("vqa",), questions=bad)
  fmt = pl.TaskFormatter(tok, ("vqa",), questions=1)
  ids, _ = fmt(ex, np.random.default_rng(0))
  assert (ids == tok.user_id).sum() == 1


def test_format_look_asks_only_colour_shape_and_position(tok):
  """"look": the image's colour, shape and position questions (every one of them, over rng
  draws, in a shuffled order), none of the count / size / colour-count / existence ones; a
  record without such questions is refused by name."""
  ex = shapes.make_example(4, "validation", resolution=32)
  look = [(qa["q"], qa["a"]) for qa in ex["qa"]
          if shapes.question_type(qa["q"]) in ("color", "shape", "position")]
  assert 2 <= len(look) < len(ex["qa"])
  firsts = set()
  for seed in range(12):
    ids, mask = pl.format_example(ex, "look", tok, rng=np.random.default_rng(seed))
    text = tok.decode(ids)
    asked = sorted((p for p in look if p[0] in text), key=lambda p: text.index(p[0]))
    assert asked and len(asked) == len(look) == (ids == tok.user_id).sum()
    assert _spans(tok, ids, mask) == [a for _, a in asked]
    assert not any(qa["q"] in text for qa in ex["qa"] if (qa["q"], qa["a"]) not in look)
    firsts.add(asked[0])
  assert len(firsts) > 1  # the order is shuffled
  ids, _ = pl.format_example(ex, "look", tok, rng=np.random.default_rng(0), questions=1)
  assert (ids == tok.user_id).sum() == 1
  ids, _ = pl.TaskFormatter(tok, ("look",))(ex, np.random.default_rng(0))
  assert (ids == tok.user_id).sum() == len(look)
  blind = {**ex, "qa": [qa for qa in ex["qa"] if shapes.question_type(qa["q"]) == "count"]}
  with pytest.raises(ValueError, match="task='look': example has none of the question types"):
    pl.format_example(blind, "look", tok, rng=np.random.default_rng(0))

def test_format_caption_attributes_and_image_span(tok):
  ex = shapes.make_example(1, "train", resolution=32)
  ids, mask = pl.format_example(ex, "caption", tok)
  assert _spans(tok, ids, mask) == [ex["captions"][0]] and mask[1:].all() and not mask[0]
  rng = np.random.default_rng(0)
  picked = {tok.decode(pl.format_example(ex, "caption", tok, rng=rng)[0]) for _ in range(40)}
  assert picked == set(ex["captions"])
  ids, mask = pl.format_example(ex, "attributes", tok)
  assert tok.decode(ids) == " ".join(ex["attributes"])
  visual = lambda e: np.arange(1000, 1006)
  ids, mask = pl.format_example(ex, "vqa", tok, image_tokens=visual)
  np.testing.assert_array_equal(ids[:9], [tok.bos_id, tok.image_begin_id, *range(1000, 1006),
                                          tok.image_end_id])
  assert not mask[:9].any()
  with pytest.raises(ValueError, match="task='ocr'"):
    pl.format_example(ex, "ocr", tok)


def test_format_icl_is_a_text_episode_drawn_from_the_rng(tok):
  # The stage-0 "icl" task ignores the record (and any image): the episode of data/icl.py that
  # the same generator draws, with its loss mask.
  ex = shapes.make_example(1, "train", resolution=32)
  ids, mask = pl.format_example(ex, "icl", tok, image_tokens=lambda e: [500],
                                rng=np.random.default_rng(3))
  want_ids, want_mask = icl.episode_ids(tok, icl.sample_episode(np.random.default_rng(3)))
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  assert tok.image_begin_id not in ids.tolist() and mask.any() and not mask.all()
  other = pl.format_example(ex, "icl", tok, rng=np.random.default_rng(4))[0]
  assert other.tolist() != ids.tolist()
  with pytest.raises(ValueError, match="task='icl': expected an rng"):
    pl.format_example(ex, "icl", tok)


def test_format_denoise_is_a_text_episode_drawn_from_the_rng(tok):
  # "denoise": icl.denoise_ids (the restoration prompt on the tokenizer's local ids) that the
  # same generator draws; no image, and it needs an rng.
  ex = shapes.make_example(1, "train", resolution=32)
  ids, mask = pl.format_example(ex, "denoise", tok, image_tokens=lambda e: [500],
                                rng=np.random.default_rng(3))
  want_ids, want_mask = icl.denoise_ids(tok, np.random.default_rng(3))
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  assert tok.image_begin_id not in ids.tolist() and mask.sum() % 2 == 1 and mask.sum() <= 21
  with pytest.raises(ValueError, match="task='denoise': expected an rng"):
    pl.format_example(ex, "denoise", tok)
  # `denoise` (lm.denoise_{ns,shots,palettes}) reaches the episodes, through the formatter too.
  for settings in ({"palettes": (1,)}, {"ns": (16,), "shots": (10,)}):
    fmt = pl.TaskFormatter(tok, ("denoise",), denoise=settings)
    for got in (pl.format_example(ex, "denoise", tok, rng=np.random.default_rng(3),
                                  denoise=settings), fmt(ex, np.random.default_rng(3))):
      want = icl.denoise_ids(tok, np.random.default_rng(3), **settings)
      np.testing.assert_array_equal(got[0], want[0])
      assert got[0].tolist() != ids.tolist()
  # n = 16 windows and all 10 examples: every episode is longer than the default's longest.
  long = [pl.format_example(ex, "denoise", tok, rng=np.random.default_rng(s),
                            denoise={"ns": (16,), "shots": (10,)})[0] for s in range(4)]
  short = [pl.format_example(ex, "denoise", tok, rng=np.random.default_rng(s))[0]
           for s in range(20)]
  assert min(map(len, long)) > max(map(len, short))
  for bad, match in (({"m": (2,)}, "unknown"), ({"shots": (11,)}, "denoise.shots"),
                     ({"ns": (0,)}, "denoise.ns"), ({"palettes": 2}, "denoise.palettes")):
    with pytest.raises(ValueError, match=match):
      pl.TaskFormatter(tok, ("denoise",), denoise=bad)
  # "induction": icl's induction episodes alone.
  ids, mask = pl.format_example(ex, "induction", tok, rng=np.random.default_rng(5))
  want = icl.episode_ids(tok, icl.induction_episode(np.random.default_rng(5)))
  np.testing.assert_array_equal(ids, want[0])
  np.testing.assert_array_equal(mask, want[1])
  # "span_induction": a span of the sequence after filler, over the label words too.
  words = set()
  for seed in range(40):
    ids, mask = pl.format_example(ex, "span_induction", tok, rng=np.random.default_rng(seed))
    episode = icl.span_induction_episode(np.random.default_rng(seed))
    want = icl.episode_ids(tok, episode)
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(mask, want[1])
    seq, span = episode.parts
    assert f" {span} " in f" {seq} "
    words.update(seq.split())
  assert words & set(icl.LABEL_SETS["color"]) and words & set(icl.LABEL_SETS["shape"])
  # "suffix_induction": the span runs to the sequence's end.
  for seed in range(10):
    ids, mask = pl.format_example(ex, "suffix_induction", tok, rng=np.random.default_rng(seed))
    want = icl.episode_ids(tok, icl.suffix_induction_episode(np.random.default_rng(seed)))
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(mask, want[1])
  # "match_classify": the classification prompt on shuffled symbol sets.
  for seed in range(10):
    ids, mask = pl.format_example(ex, "match_classify", tok, rng=np.random.default_rng(seed))
    want = icl.episode_ids(tok, icl.match_classification_episode(np.random.default_rng(seed)))
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(mask, want[1])


def test_grid_positions_layout():
  # bos <img> v v v v </img> a b: a 2x2 image after two tokens.
  ids = [1, 9, 50, 51, 52, 53, 8, 30, 31]
  pos = pl.grid_positions(ids, 9, [[0, 0], [0, 1], [1, 0], [1, 1]])
  assert pos.tolist() == [[0, 0], [1, 1], [2, 2], [2, 3], [3, 2], [3, 3], [4, 4], [5, 5],
                          [6, 6]]
  assert pl.grid_positions([1, 30, 31], 9).tolist() == [[0, 0], [1, 1], [2, 2]]
  with pytest.raises(ValueError, match="visual_positions is None"):
    pl.grid_positions(ids, 9)
  with pytest.raises(ValueError, match="only 3 tokens"):
    pl.grid_positions([1, 9, 50, 51, 8], 9, [[0, 0]] * 4)
  with pytest.raises(ValueError, match="expected exactly 1"):
    pl.grid_positions([1, 9, 50, 9, 51], 9, [[0, 0]])


def test_packed_batches_carry_grid_positions(tok):
  examples = [dict(shapes.make_example(i, "train", resolution=32), index=i) for i in range(6)]
  grid = lambda e: np.stack(np.divmod(np.arange(4 + e["index"] % 3), 2), -1)  # noqa: E731
  visual = lambda e: 1000 + np.arange(4 + e["index"] % 3)  # noqa: E731
  fmt = pl.TaskFormatter(tok, tasks=("vqa",), image_tokens=visual, image_positions=grid)
  ids, mask, pos = fmt(examples[4], np.random.default_rng(0))
  np.testing.assert_array_equal(pos, pl.grid_positions(ids, tok.image_begin_id, grid(examples[4])))
  for pack in (True, False):
    b = next(iter(pl.lm_dataset(examples, fmt, seq_len=160, batch_size=2, seed=0, grid=True,
                                truncate=True, pack=pack)))
    assert b["positions"].shape == (2, 160, 2) and b["inputs"].shape == (2, 160)
    for row in range(2):  # every packed example keeps its own layout, from (0, 0)
      for seg in set(b["segment_ids"][row].tolist()) - {0}:
        span = b["segment_ids"][row] == seg
        inputs = b["inputs"][row][span]
        n = int((inputs >= 1000).sum())  # the toy grid depends on the token count only
        want = pl.grid_positions(inputs, tok.image_begin_id, grid({"index": n - 4}))
        np.testing.assert_array_equal(b["positions"][row][span], want)
  with pytest.raises(ValueError, match="image_positions without image_tokens"):
    pl.TaskFormatter(tok, tasks=("vqa",), image_positions=grid)


def test_llava_conversations_drop_image_marker(tok):
  ex = {"conversations": [{"from": "human", "value": "<image>\nwhat color is the star?"},
                          {"from": "gpt", "value": "red"}]}
  ids, mask = pl.format_example(ex, "dialogue", tok, image_tokens=lambda e: [500, 501])
  assert tok.decode(ids[5:]) == "what color is the star? red"
  assert ids[1:5].tolist() == [tok.image_begin_id, 500, 501, tok.image_end_id]
  assert _spans(tok, ids, mask) == ["red"]
  with pytest.raises(ValueError, match="from='system'"):
    pl.format_example({"dialogue": [{"from": "system", "value": "x"}]}, "dialogue", tok)


def test_lm_pipeline_on_tfds_shapes(tok, tmp_path):
  builder = tb.build_shapes(tmp_path, resolution=32, num_train=12, num_validation=1,
                            num_test=1, seed=0)
  # Every task but the long text-only denoise / induction episodes (tested on their own above),
  # which, truncated here, would fill rows without an eos.
  fmt = pl.TaskFormatter(tok, tasks=tuple(t for t in pl.TASKS if t not in (
      "denoise", "induction", "span_induction", "suffix_induction")))
  ds = pl.lm_dataset(tb.data_source(builder, "train"), fmt, seq_len=256, batch_size=2, seed=0,
                     truncate=True)
  it = iter(ds)
  reference = _take(it, 6)
  it = iter(ds)
  _take(it, 2)
  state = it.get_state()
  it = iter(ds)
  it.set_state(state)
  _assert_same(_take(it, 4), reference[2:])
  b = reference[0]
  assert b["inputs"].shape == (2, 256) and b["loss_mask"].any()
  assert (b["inputs"] == tok.user_id).any() or (b["inputs"] == tok.eos_id).any()
  with pytest.raises(ValueError, match="tasks="):
    pl.TaskFormatter(tok, tasks=("vqa", "ocr"))


@pytest.mark.slow  # Each worker process takes seconds to start.
def test_resume_with_a_worker_process(tok, tmp_path):
  """Tokenizer, formatter and tfds source pickle into a grain worker; its state resumes."""
  builder = tb.build_shapes(tmp_path, resolution=32, num_train=10, num_validation=1,
                            num_test=1, seed=0)
  make = lambda workers: pl.lm_dataset(
      tb.data_source(builder, "train"), pl.TaskFormatter(tok, pl.TASKS), seq_len=128,
      batch_size=2, seed=0, truncate=True, worker_count=workers)
  reference = _take(iter(make(0)), 10)  # One worker: the same order as in-process.
  it = iter(make(1))
  _assert_same(_take(it, 6), reference[:6])
  state = it.get_state()
  it.close()
  it = iter(make(1))
  it.set_state(state)
  _assert_same(_take(it, 4), reference[6:])
  it.close()


def test_image_batches_from_user_images(tmp_path):
  (tmp_path / "img").mkdir()
  wide, tall = np.zeros((8, 16, 3), np.uint8), np.zeros((16, 8, 3), np.uint8)
  wide[:, 4:12], tall[4:12] = 200, 200  # The centre squares are 200, the rest 0.
  Image.fromarray(wide).save(tmp_path / "img" / "wide.png")
  Image.fromarray(tall).save(tmp_path / "img" / "tall.png")
  Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "img" / "big.png")
  (tmp_path / "c.jsonl").write_text("".join(
      f'{{"image": "{n}", "caption": "x"}}\n' for n in ["wide.png", "tall.png", "big.png"]))
  builder = tb.build_caption_pairs(tmp_path / "tfds", annotations=tmp_path / "c.jsonl",
                                   image_dir=tmp_path / "img")
  (batch,) = list(pl.dataset(tb.data_source(builder, "train"), pl.ImageMap(8), batch_size=3,
                             seed=0, num_epochs=1))
  assert batch.shape == (3, 8, 8, 3) and batch.dtype == np.uint8
  np.testing.assert_array_equal(batch, 200)
  with pytest.raises(ValueError, match="resolution=0"):
    pl.ImageMap(0)


def test_format_vqa_branches_restart_after_the_image(tok):
  """`branches=True`: the shared prefix (bos + image) is branch 0, the k-th question-answer
  pair branch k; `branch_positions` gives every branch the positions its pair has when asked
  alone after the image (the evaluation's layout), in 1D and 2D; other tasks are all branch 0."""
  ex = shapes.make_example(4, "validation", resolution=32)
  visual = lambda e: [500, 501, 502, 503]
  rng = np.random.default_rng(1)
  ids, mask, br = pl.format_example(ex, "vqa", tok, image_tokens=visual, rng=rng,
                                    branches=True)
  prefix = 1 + 4 + 2
  assert (br[:prefix] == 0).all() and br.max() == len(ex["qa"])
  assert br[prefix:].min() == 1 and (np.diff(br) >= 0).all()
  same, _ = pl.format_example(ex, "vqa", tok, image_tokens=visual,
                              rng=np.random.default_rng(1))
  np.testing.assert_array_equal(ids, same)  # the same tokens, only laid out as branches
  pos = pl.branch_positions(np.arange(len(ids)), br)
  np.testing.assert_array_equal(pos[:prefix], np.arange(prefix))
  for k in range(1, br.max() + 1):
    part = np.flatnonzero(br == k)
    assert ids[part[0]] == tok.user_id and ids[part[-1]] == tok.eos_id
    np.testing.assert_array_equal(pos[part], prefix + np.arange(len(part)))
    assert tok.decode(ids[part][mask[part]]) in {qa["a"] for qa in ex["qa"]}
  grid = np.stack([np.arange(len(ids))] * 2, -1)
  np.testing.assert_array_equal(pl.branch_positions(grid, br), np.stack([pos] * 2, -1))
  for task in ("caption", "dialogue", "icl"):
    out = pl.format_example(ex, task, tok, image_tokens=None if task == "icl" else visual,
                            rng=np.random.default_rng(0), branches=True)
    assert len(out) == 3 and not out[2].any()
  with pytest.raises(ValueError, match="one branch id per position"):
    pl.branch_positions(np.arange(5), np.zeros(4, np.int32))


def test_packed_branch_batches_keep_branches_per_segment(tok):
  """lm_dataset(branches=True) packs the formatter's dicts: every row carries branch ids and
  positions that restart after each segment's image, and (2D) grid positions too."""
  records = [shapes.make_example(i, "validation", resolution=32) for i in range(6)]
  visual = lambda e: [500 + len(e["qa"]), 501, 502]
  fmt = pl.TaskFormatter(tok, ("vqa", "caption"), image_tokens=visual, branches=True)
  batch = next(iter(pl.lm_dataset(records, fmt, seq_len=160, batch_size=2, seed=0,
                                   shuffle=False, branches=True)))
  assert set(batch) >= {"branch_ids", "positions", "segment_ids"}
  seen = 0
  for r in range(2):
    seg, br, pos, ids = (batch[k][r] for k in ("segment_ids", "branch_ids", "positions",
                                                "inputs"))
    for s in set(seg[seg > 0].tolist()):
      at = np.flatnonzero(seg == s)
      prefix = at[br[at] == 0]
      np.testing.assert_array_equal(pos[prefix], np.arange(len(prefix)))
      for k in set(br[at].tolist()) - {0}:
        part = at[br[at] == k]
        np.testing.assert_array_equal(pos[part], len(prefix) + np.arange(len(part)))
        assert ids[part[0]] == tok.user_id
        seen += 1
  assert seen >= 5  # some vqa examples with several branches were packed
  fmt2 = pl.TaskFormatter(tok, ("vqa",), image_tokens=visual, image_positions=lambda e: [
      [0, 0], [0, 1], [1, 0]], branches=True)
  batch = next(iter(pl.lm_dataset(records, fmt2, seq_len=160, batch_size=2, seed=0,
                                   shuffle=False, grid=True, branches=True)))
  assert batch["positions"].shape == (2, 160, 2) and batch["branch_ids"].max() >= 2
  with pytest.raises(ValueError, match="branch_ids"):
    pl._ShiftAndCheck(lambda r, g: {"ids": np.arange(5), "mask": np.ones(5, bool),
                                    "positions": np.arange(5), "branch_ids": np.zeros(3)},
                      8, False)(0, None)


_IMPORTS_AT_CALL = """
import json, sys
import numpy as np
from vlbpe_jax.data import pipeline, shapes
from vlbpe_jax.data.text_tokenizer import TextTokenizer
tok = TextTokenizer.load(sys.argv[1])
example = shapes.make_example(0, "train", resolution=32)
fmts = [pipeline.TaskFormatter(tok, (task,)) for task in pipeline.TASKS]
image_map = pipeline.ImageMap(16)
before = set(sys.modules)
for fmt in fmts:  # every task's formatting, as grain's reader threads call it
  fmt(example, np.random.default_rng(0))
image_map(example, None)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_map_functions_import_nothing(tok, tmp_path):
  """The map functions grain calls from its reader threads (`TaskFormatter`, `ImageMap`)
  import no module of ours or of tensorflow_datasets on their first call, in a fresh
  interpreter. A first `import tensorflow_datasets` in one reader thread deadlocked another
  (etils patches the import function process-wide while tfds imports) and hung the 2-process
  LM test in CI: caught with the workers' stack dumps (tests/test_multiprocess.py)."""
  tok.save(tmp_path / "t.model")
  out = subprocess.run([sys.executable, "-c", _IMPORTS_AT_CALL, str(tmp_path / "t.model")],
                       capture_output=True, text=True, check=True, cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  imported = json.loads(out.stdout.strip().splitlines()[-1])
  assert not [m for m in imported if m.split(".")[0] in ("vlbpe_jax", "tensorflow_datasets",
                                                          "etils")], imported
