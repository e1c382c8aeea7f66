"""Token sequences of the unified LM: visual tokens of each image, training data, prompts.

  visual = load_visual_tokens(workdir, "bpe", vq_start=tok.vocab_size)   # or "vq" (no BPE)
  ds = train_dataset(source, tok, ("caption", "attributes"), visual["train"], seq_len=256,
                     batch_size=8, seed=0)
  prompt = vqa_prompt(tok, visual["test"](example), "what color is the star?")
  prompt = image_prefix(tok, visual["test"](example))       # a caption follows

Vocabulary layout `text | special | VQ | BPE` (lm/config.py). The text tokenizer already holds
the image begin/end and role tokens, so `num_special = 0` and VQ code c has id `vq_start + c`;
a visual-BPE token t (ids `[0, V)` are the base codes, `V + k` the k-th merge) has id
`vq_start + t`, i.e. merges sit right after the VQ codes.

Inputs written by earlier stages: `W/vq/codes_{split}.npy` int32 `[N, h, w]` with
`W/vq/codes_meta.json` `{"codebook_size", "grid"}`; `W/bpe/bpe.json` and
`W/bpe/tokens_{split}.npz` (`VisualBPE.encode` output: tokens `[N, L]`, lengths `[N]`, ...).
Row i of a split belongs to the record whose `index` is i.
"""

import os

import numpy as np

from vlbpe_jax import fileio
from vlbpe_jax.data import pipeline

SPLITS = ("train", "validation", "test")
KINDS = ("bpe", "vq")


class VisualTokens:
  """`example -> int32 [L]` LM ids of its image (row `example["index"]`); picklable.

  `positions` (`[N, L, 2]`, each token's (row, col) on the code grid) makes `grid(example)`
  available: the `[L, 2]` positions of the image's tokens, for 2D RoPE.
  """

  def __init__(self, tokens, lengths, offset: int, positions=None):
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
      raise ValueError(f"tokens {tokens.shape}, lengths {lengths.shape}: expected [N, L], [N]")
    if positions is not None and np.shape(positions) != tokens.shape + (2,):
      raise ValueError(f"positions {np.shape(positions)}: expected {tokens.shape + (2,)}")
    self.positions = None if positions is None else np.asarray(positions, np.int32)
    if lengths.size and (lengths.min() < 1 or lengths.max() > tokens.shape[1]):
      raise ValueError(f"lengths in [{lengths.min()}, {lengths.max()}]: expected [1, "
                       f"{tokens.shape[1]}]")
    valid = np.arange(tokens.shape[1])[None] < lengths[:, None]
    if valid.any() and tokens[valid].min() < 0:
      raise ValueError(f"tokens hold {tokens[valid].min()} inside the lengths: expected ids >= 0")
    self.tokens = np.where(valid, tokens + offset, 0).astype(np.int32)
    self.lengths = lengths.astype(np.int32)

  def __len__(self):
    return len(self.lengths)

  def max_id(self) -> int:
    return int(self.tokens.max()) if self.tokens.size else -1

  def _row(self, example) -> int:
    i = int(example["index"])
    if not 0 <= i < len(self):
      raise ValueError(f"example index {i}: visual tokens exist for indices [0, {len(self)})")
    return i

  def __call__(self, example) -> np.ndarray:
    i = self._row(example)
    return self.tokens[i, :self.lengths[i]]

  def grid(self, example) -> np.ndarray:
    """`[L, 2]` (row, col) of the image's tokens."""
    if self.positions is None:
      raise ValueError("these visual tokens were loaded without positions")
    i = self._row(example)
    return self.positions[i, :self.lengths[i]]


def _require(path, stage):
  if not os.path.exists(path):
    raise ValueError(f"{path} is missing: run the {stage!r} stage first")
  return path


def codes_meta(workdir: str) -> dict:
  return fileio.read_json(_require(os.path.join(workdir, "vq", "codes_meta.json"), "vq"),
                         what="VQ codes metadata")


def load_visual_tokens(workdir: str, kind: str, *, vq_start: int, splits=SPLITS):
  """`({split: VisualTokens}, num_vq, num_bpe)` from the VQ (`kind="vq"`) or BPE files."""
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
  num_vq = int(codes_meta(workdir)["codebook_size"])
  out, num_bpe = {}, 0
  if kind == "bpe":
    vocab_path = _require(os.path.join(workdir, "bpe", "bpe.json"), "bpe")
    vocab = fileio.read_json(vocab_path, what="visual BPE vocabulary")
    if int(vocab["base_vocab_size"]) != num_vq:
      raise ValueError(f"bpe.json base_vocab_size={vocab['base_vocab_size']}: expected the VQ "
                       f"codebook_size={num_vq}")
    num_bpe = int(vocab["vocab_size"]) - num_vq
  for split in splits:
    if kind == "vq":
      codes = fileio.load_npy(_require(os.path.join(workdir, "vq", f"codes_{split}.npy"), "vq"),
                              what="VQ codes")
      n, h, w = codes.shape
      flat = codes.reshape(n, -1)
      rows, cols = np.divmod(np.arange(h * w), w)
      grid = np.broadcast_to(np.stack([rows, cols], -1), (n, h * w, 2))
      out[split] = VisualTokens(flat, np.full(n, h * w), vq_start, grid)
    else:
      tokens_path = _require(os.path.join(workdir, "bpe", f"tokens_{split}.npz"), "bpe")
      enc = fileio.load_npz(tokens_path, what="BPE tokens")
      if str(enc.get("bpe_digest", "")) != fileio.short_digest(vocab_path):
        raise ValueError(f"{tokens_path} was encoded with another vocabulary than {vocab_path} "
                         "(bpe_digest differs): rerun the bpe stage")
      out[split] = VisualTokens(enc["tokens"], enc["lengths"], vq_start, enc["positions"])
    if out[split].max_id() >= vq_start + num_vq + num_bpe:
      raise ValueError(f"{kind} tokens of split {split!r} reach id {out[split].max_id()}: "
                       f"expected < {vq_start + num_vq + num_bpe}")
  return out, num_vq, num_bpe


def train_dataset(source, tokenizer, tasks, visual, *, seq_len: int, batch_size: int, seed: int,
                  worker_count: int = 0, grid: bool = False, shard=None, questions: int = 0,
                  denoise=None, branches: bool = False):
  """Packed grain batches (pipeline.lm_dataset) of `batch_size` rows of examples formatted as
  `tasks` (drawn uniformly per example; repeat a name to weight it); `visual=None`: text only.
  `grid`: 2D RoPE positions `[B, T, 2]` (pipeline.grid_positions) instead of 1D. `shard`:
  `(index, count)` of the data to read (None: all of it); `pipeline.sharded_iterator` zips a
  process's shards into its rows of the global batch. `questions`: VQA questions kept per
  image (`pipeline.format_example`; 0: all); `denoise`: the "denoise" episodes' settings (ditto).
  `branches`: an image's questions as branches after it (ditto; batches get `branch_ids`)."""
  fmt = pipeline.TaskFormatter(tokenizer, tuple(tasks), image_tokens=visual,
                               image_positions=visual.grid if grid and visual else None,
                               questions=questions, denoise=denoise, branches=branches)
  return pipeline.lm_dataset(source, fmt, seq_len=seq_len, batch_size=batch_size, seed=seed,
                             truncate=True, worker_count=worker_count,
                             grid=bool(grid and visual), shard=shard, branches=branches)


def image_span(tokenizer, visual_ids) -> list[int]:
  return [tokenizer.image_begin_id] + [int(i) for i in visual_ids] + [tokenizer.image_end_id]


def image_prefix(tokenizer, visual_ids) -> list[int]:
  """`bos <img> ... </img>`, or `bos` alone when `visual_ids` is None (a text-only model)."""
  return [tokenizer.bos_id] + ([] if visual_ids is None else image_span(tokenizer, visual_ids))


def turn(tokenizer, question: str) -> list[int]:
  """`<user> question <assistant>`: the model's answer follows, ended by eos."""
  return [tokenizer.user_id] + tokenizer.encode(question) + [tokenizer.assistant_id]


def vqa_prompt(tokenizer, visual_ids, question: str) -> list[int]:
  """`bos <img> ... </img> <user> question <assistant>` (the training format of one turn)."""
  return image_prefix(tokenizer, visual_ids) + turn(tokenizer, question)


def prompt_positions(tokenizer, prompt, grid) -> np.ndarray:
  """2D RoPE positions `[L, 2]` of a prompt whose image tokens sit at `grid` (`[n, 2]`, from
  `VisualTokens.grid`; None for a prompt without an image), as in training."""
  return pipeline.grid_positions(prompt, tokenizer.image_begin_id, grid)
