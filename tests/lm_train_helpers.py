"""Shared set-up of the LM training/eval tests: a tiny config, tokenizer, data and visual files."""

import json
import os

import ml_collections
import numpy as np

from vlbpe_jax import fileio
from vlbpe_jax.bpe import model as bpe_model
from vlbpe_jax.data import shapes
from vlbpe_jax.data import text_tokenizer

RES, CELL, GRID = 32, 4, 8  # 32x32 images, 8x8 code grid of 4x4 cells
NUM = {"train": 48, "validation": 8, "test": 16}
NUM_MERGES = 12


def make_config(**lm):
  """A tiny config: width 32, 2 layers, steps (2, 2, 2), 2x2x2 mesh."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = [("data", 2), ("fsdp", 2), ("tensor", 2)]
  c.data = dict(resolution=RES, num_train=NUM["train"], num_validation=NUM["validation"],
                num_test=NUM["test"], report_examples=2)
  c.tokenizer = dict(vocab_size=400, model_type="unigram", icl_texts=200)
  c.lm = dict(
      variant="mu",
      model=dict(width=32, depth=2, num_heads=2, num_kv_heads=2, mlp_dim=64, dtype="float32"),
      seq_len=160, batch_size=8, vocab_multiple=8,
      text_steps=2, text_lr=3e-3,
      stage_steps=(2, 2, 2), stage_lrs=(3e-3, 2e-3, 1e-3), single_stage_lr=2e-3,
      stage_tasks=(("caption", "attributes"), ("vqa",), ("dialogue", "vqa")),
      first_frac=0.25, warmup_steps=0, final_lr_frac=0.1, grad_clip=1.0, weight_decay=0.0,
      b1=0.9, b2=0.95, log_every=1, ckpt_every=100, progress=False, worker_count=0,
      num_eval=8, eval_batch_size=8, max_answer_tokens=4, max_caption_tokens=16,
      runs=("full", "no_bpe", "single_stage"), report_examples=2)
  c.lm.update(lm)
  return c


def examples(split, num=None):
  """Decoded shapes examples (with `index`), as the tfds reader would give them."""
  return [dict(shapes.make_example(i, split, seed=0, resolution=RES), index=i)
          for i in range(NUM[split] if num is None else num)]


def images(split, num):
  """uint8 [num, RES, RES, 3]: the first `num` shapes images of `split`."""
  return shapes.make_images(split, 0, num, seed=0, resolution=RES)


def tokenizer(path):
  return text_tokenizer.train_on_shapes(os.path.join(path, "t.model"), num_examples=150,
                                        vocab_size=400)


def color_codes(images):
  """Stand-in VQ: each 4x4 cell's mean colour quantised to 3 levels per channel (27 codes)."""
  n = len(images)
  cells = images.reshape(n, GRID, CELL, GRID, CELL, 3).mean(axis=(2, 4))
  q = np.clip(np.round(cells / 127.5), 0, 2).astype(np.int32)
  return q[..., 0] * 9 + q[..., 1] * 3 + q[..., 2]  # [N, 8, 8] in [0, 27)


def write_visual_files(workdir, num=None):
  """Fake `vq` and `bpe` stage outputs for the first num[split] (default NUM) examples of each
  split."""
  num = num or NUM
  os.makedirs(os.path.join(workdir, "vq"), exist_ok=True)
  codes = {s: color_codes(images(s, n)) for s, n in num.items()}
  for s, c in codes.items():
    np.save(os.path.join(workdir, "vq", f"codes_{s}.npy"), c)
  with open(os.path.join(workdir, "vq", "codes_meta.json"), "w") as f:
    json.dump({"codebook_size": 27, "grid": [GRID, GRID]}, f)
  bpe = bpe_model.VisualBPE.learn(codes["train"], 27, NUM_MERGES, progress=False)
  bpe.save(os.path.join(workdir, "bpe", "bpe.json"))
  digest = fileio.short_digest(os.path.join(workdir, "bpe", "bpe.json"))  # as the stage
  for s, c in codes.items():
    np.savez(os.path.join(workdir, "bpe", f"tokens_{s}.npz"), bpe_digest=np.array(digest),
             **bpe.encode(c))
  return codes, bpe
