"""grain pipelines: per-host shard, seeded shuffle, repeat, map, pack or pad, batch, workers.

  src = tfds_builders.data_source(builder, "train")       # or any sequence
  fmt = TaskFormatter(tok, tasks=("caption", "vqa"))       # (record, rng) -> (ids, loss_mask)
  ds = lm_dataset(src, fmt, seq_len=128, batch_size=8, seed=cfg.seed)
  it = iter(ds)                 # grain DatasetIterator; it.get_state() / it.set_state(state)
  batch = next(it)              # inputs, targets, segment_ids, positions: [B, T] int32,
                                # loss_mask: [B, T] bool
  images = dataset(src, ImageMap(64), batch_size=32, seed=cfg.seed)   # uint8 [B, 64, 64, 3]
  it = sharded_iterator(functools.partial(dataset, src, ImageMap(64), seed=cfg.seed),
                        batch_size=32, data_shards=4)   # this process's rows of global batches

Checkpoints: save the iterator with the train state through orbax, using grain's handler args
`grain.checkpoint.CheckpointSave(it)` / `grain.checkpoint.CheckpointRestore(it)` (grain 0.2.18,
handler `grain.checkpoint.CheckpointHandler`; one JSON file per process, or per data shard for a
`ShardedIterator`: data/iter_state.py). Resuming yields exactly the batches an uninterrupted run
would have produced, for the same `worker_count`.

By default every host reads a contiguous, equal-sized slice of the source
(`jax.process_index()` of `jax.process_count()`; the remainder is dropped so all hosts run the
same number of steps), so `batch_size` is the per-host batch. The trainers split the data into a
fixed number `n` of shards instead (`sharded_iterator`, built on `local_shards(n)` and
`zip_shards`; their `<section>.data_shards`, 0 = one per process), each process reading (and
concatenating the batches of) its `n / processes` of them: the global batches are then the same
for any process count that divides `n` (a 2-process run equals a 1-process one, and either
resumes the other). Shuffling is reseeded every epoch (`num_epochs=None`: forever).
`worker_count > 0` runs everything up to batching in grain worker processes (different worker
counts give different, still deterministic, orders); callables must then be picklable, and absl
flags are marked parsed if nobody parsed them (grain reads its flags).

Text formats (`format_example`): `[bos] [<img> image tokens </img>] body`, where body is
  caption     caption [eos]                     loss on caption and eos
  attributes  attribute statements [eos]        loss on statements and eos
  vqa         (<user> q <assistant> a [eos])*   loss on answers and their eos
  dialogue    (<user> human | <assistant> gpt [eos])*   loss on gpt turns and their eos
Images are present only when an `image_tokens(example) -> int array` callable is given (the LM
stage plugs visual-BPE ids in); LLaVA's "<image>" marker is removed from the text, the image
span always comes first. With `image_positions(example) -> int [n, 2]` (each visual token's
(row, col)) as well, examples also carry 2D RoPE positions (`grid_positions`) and the batches'
`positions` are `[B, T, 2]`.
"""

import functools

import absl.flags
import grain
import jax
import numpy as np
from PIL import Image

from vlbpe_jax.data import icl
from vlbpe_jax.data import shapes
# Imported here, never in a map function: grain calls those from its reader threads, where a
# first import deadlocked two of them. While tfds imports some of its modules, etils swaps
# `builtins.__import__` for a lazy one process-wide; a second thread's import then got a lazy
# module whose first use held functools.cached_property's lock (one per class in Python 3.11)
# while waiting for the import lock the first thread held, and the first thread's next lazy
# attribute waited for that same lock. It hung the 2-process LM test in CI; test:
# tests/test_pipeline.py::test_map_functions_import_nothing.
from vlbpe_jax.data import tfds_builders

TASKS = ("caption", "attributes", "vqa", "dialogue", "icl", "look", "denoise", "induction",
         "span_induction", "suffix_induction", "match_classify")
# Stage 0's: no image, the record is unread.
TEXT_ONLY_TASKS = ("icl", "denoise", "induction", "span_induction", "suffix_induction",
                   "match_classify")
# "icl": a text-only in-context episode (data/icl.py: symbol->label classification, copy,
# induction), drawn from `rng`; the record is not read and no image is shown. Stage 0 of the
# unified model trains on it so that the frozen text LM of V2L learns to use examples.
# "denoise": a text-only in-context denoising episode in the layout of V2L's restoration prompt
# (icl.denoise_ids: random ids of the LM's local vocabulary, 10 noisy examples, the clean
# output as the target), drawn from `rng` like "icl". "induction": only the induction episodes
# of "icl" (a random symbol sequence, then the same again). "span_induction": a span of such a
# sequence repeated after filler (icl.span_induction_episode), which only a content match can
# copy, over the label words too; "suffix_induction": the same with the span running to the
# sequence's end (icl.suffix_induction_episode). "match_classify": V2L's classification prompt
# on shuffled symbol sets, the loss on the labels the examples decide
# (icl.match_classification_episode).
# "look": VQA reduced to the question types of LOOK_TYPES, the ones whose answer is an object's
# colour, shape or position read from the pixels (no count, size, colour count or existence,
# which a model learns first from the number of image tokens and the answer priors and which,
# mixed in, keep colour at chance for hundreds of steps: BENCHMARKS.md, "What holds colour
# back"). It needs questions made by shapes.questions (their type is read from the template).
LOOK_TYPES = ("color", "shape", "position")
# Reader threads and buffer of each process (grain's defaults, 16 and 500, suit remote disks and
# big hosts; these suit local array_record files on a few cores).
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=128)


def shard_slice(num_examples: int, shard_index: int | None = None,
                shard_count: int | None = None) -> slice:
  """This host's contiguous slice; equal sizes on all hosts (default: jax process index)."""
  if shard_index is None or shard_count is None:
    opts = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    shard_index, shard_count = opts.shard_index, opts.shard_count
  grain.sharding.ShardOptions(shard_index, shard_count)  # Validates the pair.
  per_shard = num_examples // shard_count
  if per_shard == 0:
    raise ValueError(f"num_examples={num_examples}: fewer than shard_count={shard_count}")
  return slice(shard_index * per_shard, (shard_index + 1) * per_shard)


def local_shards(num_shards: int = 0) -> list[tuple[int, int]]:
  """This process's `(index, count)` shards of data split `num_shards` ways (0: one shard per
  process); each process reads `num_shards / jax.process_count()` consecutive ones."""
  opts = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  index, count = opts.shard_index, opts.shard_count
  num_shards = int(num_shards) or count
  if num_shards < 1 or num_shards % count:
    raise ValueError(f"data shards={num_shards}: expected 0 (one per process) or a positive "
                     f"multiple of the {count} processes")
  per = num_shards // count
  return [(index * per + i, num_shards) for i in range(per)]


def _concat_batches(batches):
  return jax.tree.map(lambda *rows: np.concatenate(rows), *batches)


def zip_shards(make_dataset, shards) -> grain.IterDataset:
  """`make_dataset(shard)` of each shard (pytrees of `[b, ...]` batches), zipped into one
  dataset of `[len(shards) * b, ...]` batches, the shards' rows in order."""
  if len(shards) == 1:
    return make_dataset(shards[0])
  return grain.experimental.ZipIterDataset([make_dataset(s) for s in shards]).map(
      _concat_batches)


class ShardedIterator:
  """A grain iterator over `zip_shards(..., shards)` whose state is kept per shard
  (`{"shard_<i>-of-<n>": state}`), so that a checkpoint written by any number of processes
  restores in any other (`iter_state.DataIterHandler` writes one file per shard)."""

  def __init__(self, iterator, shards):
    self.iterator, self.shards = iterator, [tuple(s) for s in shards]

  @property
  def shard_names(self) -> list[str]:
    return [f"shard_{i}-of-{n}" for i, n in self.shards]

  def __iter__(self):
    return self

  def __next__(self):
    return next(self.iterator)

  def get_state(self) -> dict:
    state = self.iterator.get_state()
    states = state["parents"] if len(self.shards) > 1 else [state]
    return dict(zip(self.shard_names, states))

  def set_state(self, state: dict):
    missing = [k for k in self.shard_names if k not in state]
    if missing:
      raise ValueError(f"data iterator state holds shards {sorted(state)}; expected "
                       f"{self.shard_names} (missing {missing})")
    states = [state[k] for k in self.shard_names]
    self.iterator.set_state({"parents": states} if len(states) > 1 else states[0])


def sharded_iterator(make_dataset, *, batch_size: int, data_shards: int = 0,
                     section: str = "") -> ShardedIterator:
  """This process's rows of global batches of `batch_size`, from data split `data_shards` ways.

  `make_dataset(shard=(index, count), batch_size=rows)` gives one shard's batches of
  `rows = batch_size / shards` (e.g. `functools.partial(dataset, source, map_fn, seed=seed)`);
  this process's shards (`local_shards`: 0 = one shard per process) are zipped (`zip_shards`)
  into a `ShardedIterator`. A fixed `data_shards` gives the same global batches, and
  checkpoints that restore, for any process count dividing it. `section` (e.g. "clip") names
  the config fields in errors.
  """
  shards = local_shards(data_shards)
  num_shards = shards[0][1]
  if batch_size % num_shards:
    pre = f"{section}." if section else ""
    why = f"{pre}data_shards={data_shards}" + ("" if data_shards else ": one per process")
    raise ValueError(f"{pre}batch_size={batch_size} does not split over {num_shards} data "
                     f"shards ({why})")
  rows = batch_size // num_shards
  return ShardedIterator(iter(zip_shards(
      lambda shard: make_dataset(shard=shard, batch_size=rows), shards)), shards)


def _start(source, *, seed, shuffle, num_epochs, shard):
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError("source: expected a non-empty random-access source")
  if num_epochs is not None and (int(num_epochs) != num_epochs or num_epochs < 1):
    raise ValueError(f"num_epochs={num_epochs!r}: expected a positive int or None (forever)")
  ds = grain.MapDataset.source(source).seed(seed)
  ds = ds[shard_slice(len(source), *(shard or (None, None)))]
  if shuffle:
    ds = ds.shuffle()
  return ds.repeat(num_epochs)


def _finish(ds, *, batch_size, worker_count):
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: expected >= 1")
  ds = ds.batch(batch_size, drop_remainder=True)
  if worker_count < 0:
    raise ValueError(f"worker_count={worker_count}: expected >= 0 (0 = in-process)")
  if worker_count > 0:
    if not absl.flags.FLAGS.is_parsed():
      absl.flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return ds


def dataset(source, map_fn=None, *, batch_size: int, seed: int, shuffle: bool = True,
            num_epochs: int | None = None, worker_count: int = 0, shard=None,
            read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """Batches of `map_fn(record, rng)` (numpy trees of fixed shapes), e.g. images for the VQ.

  `shard`: optional `(index, count)` overriding the jax process index/count.
  """
  ds = _start(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, shard=shard)
  if map_fn is not None:
    ds = ds.random_map(map_fn)
  ds = ds.to_iter_dataset(read_options or READ_OPTIONS)
  return _finish(ds, batch_size=batch_size, worker_count=worker_count)


class ImageMap:
  """`(record, rng) -> uint8 [R, R, 3]` for `dataset`: decodes a record's image, center-crops
  it to a square and resizes it (Pillow, bicubic) when its side is not `resolution`."""

  def __init__(self, resolution: int):
    if resolution < 1:
      raise ValueError(f"resolution={resolution}: expected >= 1")
    self.resolution = resolution

  def __call__(self, record, rng):
    del rng
    image = tfds_builders.decode_record({"image": record["image"]})["image"]
    h, w = image.shape[:2]
    if (h, w) == (self.resolution,) * 2:
      return image
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top:top + side, left:left + side])
    return np.asarray(square.resize((self.resolution,) * 2, Image.Resampling.BICUBIC))


def grid_positions(ids, image_begin_id: int, visual_positions=None) -> np.ndarray:
  """2D RoPE positions `[L, 2]` int32 of a token sequence with at most one image.

  Text tokens sit on the diagonal, `(p, p)`, p counting up (so they read as 1D RoPE, see
  lm/layers.py). The `n` tokens after `image_begin_id` are the image: token i gets
  `(p + row_i, p + col_i)` from `visual_positions` (`[n, 2]`, row/col on the code grid), and
  the text after it resumes at `p + max(row, col) + 1` (M-RoPE's layout).
  """
  ids = np.asarray(ids)
  out = np.stack([np.arange(len(ids))] * 2, axis=-1).astype(np.int32)
  begins = np.flatnonzero(ids == image_begin_id)
  if visual_positions is None:
    if begins.size:
      raise ValueError("ids hold an image but visual_positions is None")
    return out
  grid = np.asarray(visual_positions, np.int32).reshape(-1, 2)
  if begins.size != 1:
    raise ValueError(f"ids hold {begins.size} images: expected exactly 1 with visual_positions")
  start = int(begins[0]) + 1
  if start + len(grid) > len(ids):
    raise ValueError(f"{len(grid)} visual positions but only {len(ids) - start} tokens after "
                     "the image begin token")
  if grid.size and grid.min() < 0:
    raise ValueError(f"visual_positions hold {grid.min()}: expected rows/cols >= 0")
  out[start:start + len(grid)] = start + grid
  extent = int(grid.max()) + 1 if grid.size else 0
  out[start + len(grid):] += extent - len(grid)
  return out


class _ShiftAndCheck:
  """(ids, mask[, positions [L, 2]]) or {"ids", "mask", "positions" [L] or [L, 2],
  "branch_ids" [L]} -> inputs/targets/loss_mask[/grid_positions][/text_positions, branch_ids]
  of length L-1; picklable for grain workers."""

  def __init__(self, to_tokens, seq_len, truncate):
    self.to_tokens, self.seq_len, self.truncate = to_tokens, seq_len, truncate

  def __call__(self, record, rng):
    out = self.to_tokens(record, rng)
    if not isinstance(out, dict):
      return self._check(*out[:2], out[2] if len(out) == 3 else None)
    branch = np.asarray(out["branch_ids"], np.int32)
    if branch.shape != np.shape(out["ids"]):
      raise ValueError(f"to_tokens returned branch_ids {branch.shape}: expected "
                       f"{np.shape(out['ids'])}")
    ex = self._check(out["ids"], out["mask"], out["positions"], allow_1d=True)
    ex["branch_ids"] = branch[:len(ex["inputs"])]
    return ex

  def _check(self, ids, mask, pos, allow_1d=False):
    """`allow_1d`: 1D `pos` `[L]` allowed too (-> text_positions)."""
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.bool_)
    pos = None if pos is None else np.asarray(pos, np.int32)
    one_d = pos if allow_1d and pos is not None and pos.ndim == 1 else None
    pos = None if one_d is not None else pos
    if ids.ndim != 1 or ids.shape != mask.shape or len(ids) < 2:
      raise ValueError(f"to_tokens returned ids {ids.shape} and mask {mask.shape}: expected "
                       "equal 1-D shapes of length >= 2")
    if pos is not None and pos.shape != ids.shape + (2,):
      raise ValueError(f"to_tokens returned positions {pos.shape}: expected {ids.shape + (2,)}")
    if one_d is not None and one_d.shape != ids.shape:
      raise ValueError(f"to_tokens returned positions {one_d.shape}: expected {ids.shape}")
    if len(ids) > self.seq_len + 1:
      if not self.truncate:
        raise ValueError(f"example of {len(ids)} tokens > seq_len + 1 = {self.seq_len + 1}; "
                         "raise seq_len or pass truncate=True")
      ids, mask = ids[:self.seq_len + 1], mask[:self.seq_len + 1]
      pos = None if pos is None else pos[:self.seq_len + 1]
      one_d = None if one_d is None else one_d[:self.seq_len + 1]
    ex = {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}
    if pos is not None:
      ex["grid_positions"] = pos[:-1]
    if one_d is not None:
      ex["text_positions"] = one_d[:-1]
    return ex


def _pad(ex, seq_len):
  n = len(ex["inputs"])
  out = {k: np.pad(v, [(0, seq_len - n)] + [(0, 0)] * (v.ndim - 1)) for k, v in ex.items()}
  out["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
  out["positions"] = out.pop("grid_positions", out.pop("text_positions", None))
  if out["positions"] is None:
    out["positions"] = np.where(out["segment_ids"] > 0, np.arange(seq_len), 0).astype(np.int32)
  return out


def _unpacked_names(ex):
  out = {"inputs": ex["inputs"], "targets": ex["targets"], "loss_mask": ex["loss_mask"],
         "segment_ids": ex["inputs_segment_ids"],
         "positions": ex.get("grid_positions", ex.get("text_positions",
                                                      ex["inputs_positions"]))}
  if "branch_ids" in ex:
    out["branch_ids"] = ex["branch_ids"]
  return out


def lm_dataset(source, to_tokens, *, seq_len: int, batch_size: int, seed: int,
               pack: bool = True, num_packing_bins: int | None = None, truncate: bool = False,
               shuffle: bool = True, num_epochs: int | None = None, worker_count: int = 0,
               shard=None, read_options: grain.ReadOptions | None = None,
               grid: bool = False, branches: bool = False) -> grain.IterDataset:
  """Next-token batches from `to_tokens(record, rng) -> (ids [L], loss_mask [L])`.

  Returns batches of `inputs = ids[:-1]`, `targets = ids[1:]`, `loss_mask = mask[1:]` (True
  where the target counts), `segment_ids` (1, 2, ... per packed example; 0 = padding) and
  `positions` (restart at 0 per example), all [batch_size, seq_len]. `pack=True` packs
  several examples per row with grain's first-fit packing (`num_packing_bins`, default
  `batch_size`); otherwise each row holds one example padded with 0. Examples longer than
  `seq_len + 1` tokens raise unless `truncate`. `grid=True`: `to_tokens` also returns 2D
  positions `[L, 2]` (`grid_positions`), and `positions` is `[batch_size, seq_len, 2]`.
  `branches=True`: `to_tokens` returns a dict (`TaskFormatter(branches=True)`), and batches
  also hold `branch_ids` (`format_example`'s) with its `positions`.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len}: expected >= 1")
  ds = _start(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, shard=shard)
  ds = ds.random_map(_ShiftAndCheck(to_tokens, seq_len, truncate)).to_iter_dataset(
      read_options or READ_OPTIONS)
  if pack:
    lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
    if grid:
      lengths["grid_positions"] = seq_len
    if branches:
      lengths["branch_ids"] = seq_len
      if not grid:
        lengths["text_positions"] = seq_len
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=lengths, num_packing_bins=num_packing_bins or batch_size,
        shuffle_bins=False)
    ds = ds.map(_unpacked_names)
  else:
    ds = ds.map(functools.partial(_pad, seq_len=seq_len))
  return _finish(ds, batch_size=batch_size, worker_count=worker_count)


def _encode(tokenizer, text):
  return tokenizer.encode(text.replace("<image>", "").strip())


def _check_questions(questions) -> int:
  """`questions` of `format_example` as an int; ValueError unless an int >= 0."""
  if isinstance(questions, bool) or int(questions) != questions or questions < 0:
    raise ValueError(f"questions={questions!r}: expected an int >= 0 (0: every question)")
  return int(questions)


# Bounds (low, high or None, meaning) of the "denoise" episodes' settings (icl.denoise_task).
_DENOISE_RANGES = {"ns": (1, None, "window lengths n"),
                   "shots": (1, icl.corrupt.NUM_COPIES, "numbers of examples"),
                   "palettes": (0, None, "palette sizes; 0: all local ids")}


def check_denoise(denoise, prefix: str = "denoise.") -> dict:
  """`denoise` settings of `format_example` as a dict of int tuples ({} for None). ValueError,
  naming `prefix + key`, on a key that is not one of `icl.TRAIN_DENOISE`'s or a value that is
  not a non-empty tuple of ints in its range."""
  if denoise is None:
    return {}
  bad = sorted(set(dict(denoise)) - set(_DENOISE_RANGES))
  if bad:
    raise ValueError(f"denoise settings {bad} unknown: expected keys among "
                     f"{sorted(_DENOISE_RANGES)}")
  for key, value in dict(denoise).items():
    low, high, what = _DENOISE_RANGES[key]
    if isinstance(value, (str, int)) or not len(value) or any(
        isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < low
        or (high is not None and k > high) for k in value):
      raise ValueError(f"{prefix}{key}={value!r}: expected a non-empty tuple of ints in "
                       f"[{low}, {high or 'inf'}] ({what})")
  return {k: tuple(int(v) for v in vs) for k, vs in dict(denoise).items()}


def format_example(example, task: str, tokenizer, *, image_tokens=None, rng=None,
                   questions: int = 0, denoise=None, branches: bool = False):
  """(ids [L] int32, loss_mask [L] bool) of one decoded example for one task family.

  `rng` (np.random.Generator) picks one of `example["captions"]` for "caption" and shuffles the
  question order of "vqa" (so that every question type is trained right after the image, where
  evaluation asks it, and no answer is always preceded by the same others); without it the first
  caption and the stored order are used. `questions=k > 0` keeps k of the image's questions
  (drawn by `rng`, which it needs) in "vqa": the others' answers are then not in the sequence,
  where they name the colours and shapes a later question asks about (a text shortcut past the
  image; BENCHMARKS.md, "Unified LM: what the model reads"). 0 keeps them all. "look" is "vqa"
  on the questions of the types `LOOK_TYPES` only (the same order and `questions` rules).
  `denoise`: the "denoise" episodes' `icl.denoise_task` settings (a dict of `ns`, `shots`
  and/or `palettes`) over `icl.TRAIN_DENOISE`'s; None: those.
  `branches=True` also returns branch ids `[L]` int32: 0 for the shared prefix (bos and the
  image), k for the k-th question-answer pair of "vqa"/"look", 0 everywhere in other tasks.
  With `branch_positions` and `LM(..., branch_ids=...)` each question then sees the image
  and itself only, in the position where evaluation asks it: all of an image's questions
  train in one sequence that pays for the image once, without the text shortcut.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r}: expected one of {TASKS}")
  _check_questions(questions)
  if questions and rng is None:
    raise ValueError(f"questions={questions}: expected an rng to draw them with")
  if task in TEXT_ONLY_TASKS:
    if rng is None:
      raise ValueError(f"task={task!r}: expected an rng (the episode is drawn from it)")
    if task == "denoise":
      out = icl.denoise_ids(tokenizer, rng, **check_denoise(denoise))
    else:
      episode = {"icl": icl.sample_episode, "induction": icl.induction_episode,
                 "span_induction": icl.span_induction_episode,
                 "suffix_induction": icl.suffix_induction_episode,
                 "match_classify": icl.match_classification_episode}[task](rng)
      out = icl.episode_ids(tokenizer, episode)
    return (*out, np.zeros(len(out[0]), np.int32)) if branches else out
  ids, mask = [tokenizer.bos_id], [False]
  branch = []  # (start, end) of each question-answer pair with branches
  if image_tokens is not None:
    visual = [int(i) for i in np.asarray(image_tokens(example)).reshape(-1)]
    ids += [tokenizer.image_begin_id] + visual + [tokenizer.image_end_id]
    mask += [False] * (len(visual) + 2)

  def add(piece_ids, loss):
    ids.extend(piece_ids)
    mask.extend([loss] * len(piece_ids))

  if task in ("caption", "attributes"):
    if task == "caption":
      captions = example.get("captions") or [example["caption"]]
      text = captions[rng.integers(len(captions))] if rng is not None else captions[0]
    else:
      text = " ".join(example["attributes"])
    add(_encode(tokenizer, text) + [tokenizer.eos_id], True)
  elif task in ("vqa", "look"):
    qas = example["qa"]
    if task == "look":
      qas = [qa for qa in qas if shapes.question_type(qa["q"]) in LOOK_TYPES]
      if not qas:
        raise ValueError(f"task='look': example has none of the question types {LOOK_TYPES} "
                         f"(its questions: {[qa['q'] for qa in example['qa']]})")
    order = rng.permutation(len(qas)) if rng is not None else range(len(qas))
    if questions:
      order = order[:questions]
    for qa in (qas[i] for i in order):
      start = len(ids)
      add([tokenizer.user_id] + _encode(tokenizer, qa["q"]) + [tokenizer.assistant_id],
          False)
      add(_encode(tokenizer, qa["a"]) + [tokenizer.eos_id], True)
      branch.append((start, len(ids)))
  else:
    turns = example.get("dialogue") or example.get("conversations")
    if not turns:
      raise ValueError("task='dialogue': example has no 'dialogue' or 'conversations'")
    for turn in turns:
      if turn["from"] == "human":
        add([tokenizer.user_id] + _encode(tokenizer, turn["value"]), False)
      elif turn["from"] == "gpt":
        add([tokenizer.assistant_id], False)
        add(_encode(tokenizer, turn["value"]) + [tokenizer.eos_id], True)
      else:
        raise ValueError(f"turn from={turn['from']!r}: expected 'human' or 'gpt'")
  out = np.asarray(ids, np.int32), np.asarray(mask, np.bool_)
  if not branches:
    return out
  branch_ids = np.zeros(len(ids), np.int32)
  for k, (lo, hi) in enumerate(branch, 1):
    branch_ids[lo:hi] = k
  return (*out, branch_ids)


def branch_positions(positions, branch_ids) -> np.ndarray:
  """Positions (`[L]` or `[L, 2]`) of a sequence laid out in one line, moved so that every
  branch k > 0 starts where the first one does (right after the shared prefix): each branch
  then has the positions it would have alone after the prefix (`format_example`'s branches).
  """
  positions, branch_ids = np.array(positions, np.int32), np.asarray(branch_ids)
  if branch_ids.shape != positions.shape[:1]:
    raise ValueError(f"branch_ids {branch_ids.shape} and positions {positions.shape}: expected "
                     "one branch id per position")
  ids, starts = np.unique(branch_ids, return_index=True)  # each branch's first token
  if ids.size and ids[0] < 0:
    raise ValueError(f"branch_ids hold {ids[0]}: expected ids >= 0 (0: the shared prefix)")
  ids, starts = ids[ids > 0], starts[ids > 0]
  for k, i in zip(ids, starts):
    positions[branch_ids == k] -= positions[i] - positions[starts.min()]
  return positions


class TaskFormatter:
  """`(record, rng) -> (ids, loss_mask)` for `lm_dataset`: decodes a tfds record (or takes a
  shapes dict as is) and formats it as a task drawn uniformly from `tasks` with `rng`. With
  `image_positions` (and `image_tokens`) it returns `(ids, loss_mask, grid_positions(...))`
  (use `lm_dataset(..., grid=True)`). `questions`: `format_example`'s (VQA questions kept per
  image; 0: all); `denoise`: `format_example`'s (the "denoise" episodes' settings).
  `branches=True`: every example as a dict with `positions` (1D, or 2D with
  `image_positions`) and `branch_ids` (`format_example`'s; use `lm_dataset(...,
  branches=True)`).

  A class rather than a closure so that it pickles into grain workers.
  """

  def __init__(self, tokenizer, tasks=("caption",), *, image_tokens=None,
               image_positions=None, questions: int = 0, denoise=None,
               branches: bool = False):
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
      raise ValueError(f"tasks={tasks!r}: expected a non-empty subset of {TASKS}")
    if image_positions is not None and image_tokens is None:
      raise ValueError("image_positions without image_tokens: expected both or neither")
    self.tokenizer, self.tasks, self.image_tokens = tokenizer, tuple(tasks), image_tokens
    self.image_positions = image_positions
    self.questions = _check_questions(questions)
    self.denoise = check_denoise(denoise)
    self.branches = bool(branches)

  def __call__(self, record, rng):
    example = tfds_builders.decode_record(record)
    task = self.tasks[rng.integers(len(self.tasks))] if len(self.tasks) > 1 else self.tasks[0]
    out = format_example(example, task, self.tokenizer, image_tokens=self.image_tokens,
                         rng=rng, questions=self.questions, denoise=self.denoise,
                         branches=self.branches)
    ids, mask = out[:2]
    if self.image_positions is None:
      pos = np.arange(len(ids), dtype=np.int32) if self.branches else None
    else:
      pos = grid_positions(ids, self.tokenizer.image_begin_id, self.image_positions(example))
    if not self.branches:
      return (ids, mask) if pos is None else (ids, mask, pos)
    return {"ids": ids, "mask": mask, "positions": branch_positions(pos, out[2]),
            "branch_ids": out[2]}
