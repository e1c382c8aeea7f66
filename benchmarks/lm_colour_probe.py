"""Can a small LM read an object's colour (or shape) from the demo's image tokens, how fast?

A fresh `LM` (lm/model.py, no text pretraining, no stages) trained on one question only, "what
color is the <shape>?", asked about an object whose shape is unique in its image, with the loss
on the one answer token: the image tokens the pipeline gives the unified model, none of its
other tasks and no other question's answer in the sequence. Accuracy on test images (exact
colour, chance 1/8) every `--steps / 10` steps. `--question=shape` asks "what shape is the
<colour> one?" about an object whose colour is unique in its image instead (chance 1/6).
`--order=question` puts the question before the image (the answer then follows `</img>`).
`--render=R` renders the scenes at R pixels instead of reading the workdir's tokens (R a
multiple of 4 up to 64; e.g. 48, where the 3x3 layout's cells are 16 px, four 4-px patches,
so an object's codes no longer depend on its cell), encodes them with the workdir's VQ (its
patch-wise encoder: the R x R corner of a 64 px canvas filled with the background, the corner's
codes kept) and BPE. At the end the test accuracy is split by whether the asked object's exact
rendering (shape, colour, size, cell, background) occurs in a training image.

  python benchmarks/lm_colour_probe.py --workdir=runs/demo --tokens=bpe --scenes=one
  python benchmarks/lm_colour_probe.py --workdir=runs/demo --tokens=bpe --scenes=all
  python benchmarks/lm_colour_probe.py --workdir=runs/demo --tokens=bpe --question=shape

`--tokens`: `bpe` (workdir/bpe/tokens_*.npz), `vq` (workdir/vq/codes_*.npy), `oracle` (each
4x4 cell's colour on 27 levels at 32 px, tests/lm_train_helpers.color_codes; no workdir
needed) or `factored` (an oracle that keeps colour apart from form: one token per 4x4 patch of
the scenes rendered at `--render` px, 48 by default, made of its look, colour and background,
and its form, the mask of its object pixels; no workdir needed). `--embed=factored` (with
`--tokens=factored`) gives a token the sum of a row for its look and a row for its form
instead of a row of its own, so what is learnt of a form in one colour serves every colour:

  python benchmarks/lm_colour_probe.py --tokens=factored --embed=factored --question=shape

`--tokens=twotone` is that tokenizer learnt from pixels alone (vq/twotone.py: each patch's two
colours x its bitmap, codebooks fitted on the train split; no workdir needed), optionally
with a visual BPE over its codes (`--merges=N`); `--embed=factored` then gives a merged token
the mean over its cells of look + form + a row for the cell's place in the token:

  python benchmarks/lm_colour_probe.py --tokens=twotone --merges=512 --embed=factored \
      --question=shape

`--scenes=one`: one-object images only; `all`: every image with a unique-shape object.
Scenes are `shapes.make_scene(i, split, seed=0)`, the demo's data (its `seed` is 0).
BENCHMARKS.md, "Unified LM: what the model reads", has the figures.
"""

import os
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlbpe_jax.bpe import VisualBPE
from vlbpe_jax.data import shapes
from vlbpe_jax.lm.model import LM, lm_config
from vlbpe_jax.vq import tokenizer as vq_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import lm_train_helpers  # noqa: E402  (tests/: the oracle codes of tests/test_lm_learns.py)
from probe_tokens import COLOR0, COLORS, SHAPE0, SHAPES, VIS0  # noqa: E402
from probe_tokens import factored_tokens, per_split, questions, rendered_tokens  # noqa: E402
from probe_tokens import twotone_tokens  # noqa: E402

WORKDIR = flags.DEFINE_string("workdir", None, "finished demo workdir (vq and bpe stages)")
TOKENS = flags.DEFINE_enum("tokens", "bpe", ["bpe", "vq", "oracle", "factored", "twotone"],
                           "image tokens")
EMBED = flags.DEFINE_enum(
    "embed", "free", ["free", "factored"], "visual rows: one free row per token id, or (with "
    "--tokens=factored or twotone) the sum of a row for its look and a row for its form")
SCENES = flags.DEFINE_enum("scenes", "one", ["one", "all"], "which images")
STEPS = flags.DEFINE_integer("steps", 300, "training steps")
BATCH = flags.DEFINE_integer("batch", 16, "questions per step")
LR = flags.DEFINE_float("lr", 3e-3, "peak learning rate (20 warm-up steps, cosine to 10%)")
QUESTION = flags.DEFINE_enum("question", "color", ["color", "shape"], "what is asked")
VARIANT = flags.DEFINE_string("variant", "mu", "lm/config.py VARIANTS entry")
NUM_TRAIN = flags.DEFINE_integer("num_train", 5000, "at most this many training questions")
ORDER = flags.DEFINE_enum(
    "order", "image", ["image", "question"], "what comes first in a row: the image (the "
    "pipeline's format, the answer follows the question) or the question (the answer follows "
    "the image, whose tokens can attend to the question)")
RENDER = flags.DEFINE_integer(
    "render", 0, "0: the workdir's stored tokens; R: the scenes rendered at R px (a multiple "
    "of 4, at most the VQ's resolution) and encoded here with the workdir's VQ and BPE")
NUM_IMAGES = flags.DEFINE_integer(
    "num_images", 0, "training images (0: the workdir's train split; more: the next scenes of "
    "the train split, rendered and encoded with the workdir's VQ (and BPE) here)")
MERGES = flags.DEFINE_integer(
    "merges", 0, "--tokens=twotone: 0, one token per patch; N, a visual BPE of N merges (the "
    "demo's settings) over the patches' codes, a token's factored row the mean over its cells")
JOINT = flags.DEFINE_bool(
    "joint", False, "--merges with --embed=factored: a merged token's row is the mean over its "
    "cells of look + a row for the cell's (form, place) pair, instead of look + form + place")
BPE_OVER = flags.DEFINE_enum(
    "bpe_over", "codes", ["codes", "forms"], "--merges: the BPE learns over the product codes, "
    "or over the forms alone (a token: a BPE token of forms + its cells' looks; factored row: "
    "the form token's row + the mean of its cells' look rows)")

WARMUP = 20  # learning-rate warm-up steps


def oracle_codes(index, split):
  """27 colour levels per 4x4 cell of the 32 px render (the tests' stand-in VQ): `[64]`."""
  img = shapes.render(shapes.make_scene(index, split), 32,
                      background=shapes.scene_background(index, split))
  return lm_train_helpers.color_codes(img[None])[0].reshape(-1)


def more_codes(workdir, first, last):
  """VQ codes `[last - first, h, w]` of train scenes first..last-1 (rendered as the data stage
  renders them: the VQ config's resolution, seed 0), encoded with the workdir's VQ."""
  tok = vq_tokenizer.Tokenizer.from_workdir(workdir)
  return tok.encode(shapes.make_images("train", first, last - first, resolution=tok.resolution))


def image_tokens(workdir, kind, num_images=0):
  """`(split -> index -> tokens [L]` or None past the split, number of token ids, whether an
  object's cell changes its tokens, the factored rows' recipe (probe_tokens.composition) or
  None where tokens do not factor)`. `num_images` > the stored train split: the next train
  scenes, encoded here."""
  if kind == "factored":
    return factored_tokens(RENDER.value or 48, max(num_images, 2000))
  if kind == "twotone":
    return twotone_tokens(RENDER.value or 48, max(num_images, 2000), merges=MERGES.value,
                          joint=JOINT.value, over=BPE_OVER.value)
  if RENDER.value:
    return *rendered_tokens(workdir, kind, RENDER.value, max(num_images, 2000)), None
  if kind == "oracle":
    return lambda split, i: oracle_codes(i, split), 27, True, None
  if workdir is None:
    raise ValueError(f"--tokens={kind}: expected --workdir, a finished demo workdir")
  codes = {s: np.load(os.path.join(workdir, "vq", f"codes_{s}.npy")) for s in ("train", "test")}
  stored = len(codes["train"])
  extra = more_codes(workdir, stored, num_images) if num_images > stored else None
  if kind == "vq":
    if extra is not None:
      codes["train"] = np.concatenate([codes["train"], extra])
    n = int(max(c.max() for c in codes.values())) + 1
    return per_split({s: c.reshape(len(c), -1) for s, c in codes.items()}), n, True, None
  enc = {s: np.load(os.path.join(workdir, "bpe", f"tokens_{s}.npz")) for s in ("train", "test")}
  enc = {s: {k: e[k] for k in ("tokens", "lengths")} for s, e in enc.items()}
  if extra is not None:
    more = VisualBPE.load(os.path.join(workdir, "bpe", "bpe.json")).encode(extra)
    enc["train"] = {"tokens": [*enc["train"]["tokens"], *more["tokens"]],
                    "lengths": np.concatenate([enc["train"]["lengths"], more["lengths"]])}
  n = int(max(max(np.max(t) for t in e["tokens"]) for e in enc.values())) + 1
  return (per_split({s: [t[:k] for t, k in zip(e["tokens"], e["lengths"])]
                     for s, e in enc.items()}), n, True, None)


def main(argv):
  del argv
  if STEPS.value <= WARMUP:
    raise ValueError(f"--steps={STEPS.value}: expected more than the {WARMUP} warm-up steps")
  if EMBED.value == "factored" and TOKENS.value not in ("factored", "twotone"):
    raise ValueError(f"--embed=factored with --tokens={TOKENS.value}: expected --tokens=factored "
                     "or twotone")
  if (MERGES.value or JOINT.value or BPE_OVER.value != "codes") and TOKENS.value != "twotone":
    raise ValueError(f"--merges, --joint or --bpe_over with --tokens={TOKENS.value}: expected "
                     "--tokens=twotone")
  if MERGES.value < 0 or (not MERGES.value and (JOINT.value or BPE_OVER.value != "codes")):
    raise ValueError(f"--merges={MERGES.value} (with --joint={JOINT.value}, --bpe_over="
                     f"{BPE_OVER.value}): expected merges >= 0, and > 0 for --joint or --bpe_over")
  if JOINT.value and BPE_OVER.value != "codes":
    raise ValueError("--joint with --bpe_over=forms: expected --bpe_over=codes (a token of "
                     "forms has no per-cell form rows)")
  tokens, num_tokens, with_cell, recipe = image_tokens(WORKDIR.value, TOKENS.value,
                                                          NUM_IMAGES.value)
  one = SCENES.value == "one"
  asked = QUESTION.value
  x, seg, y, (_, train_renderings) = questions("train", tokens, NUM_TRAIN.value, one, asked,
                                               ORDER.value, with_cell)
  tx, tseg, ty, (test_renderings, _) = questions("test", tokens, 500, one, asked, ORDER.value,
                                                 with_cell)
  print(f"{len(y)} training / {len(ty)} test questions, {x.shape[1]} tokens per row")
  kw = dict(dtype="float32")
  if VARIANT.value == "mu":
    kw.update(width=64, num_heads=4, num_kv_heads=2, mlp_dim=192)
  model = LM(lm_config(VARIANT.value, text_vocab=VIS0 + num_tokens, **kw))
  params = {"lm": nn.unbox(model.init(jax.random.key(0), x[:2])["params"])}
  if EMBED.value == "factored":  # rows = recipe @ parts: look + form (+ offset) rows
    std = float(np.std(params["lm"]["text_embed"])) / np.sqrt(2)
    width = params["lm"]["text_embed"].shape[1]
    recipe, sizes = jnp.asarray(recipe[0]), recipe[1]
    keys = [*jax.random.split(jax.random.key(1)), jax.random.key(2)]  # looks, forms, offsets
    params["parts"] = jnp.concatenate([std * jax.random.normal(k, (n, width))
                                       for k, n in zip(keys, sizes)])

  def lm_params(p):
    if EMBED.value == "free":
      return p["lm"]
    rows = recipe @ p["parts"]
    return dict(p["lm"], text_embed=p["lm"]["text_embed"].at[VIS0:].set(rows))
  schedule = optax.warmup_cosine_decay_schedule(0.0, LR.value, WARMUP, STEPS.value,
                                                 LR.value * 0.1)
  opt = optax.adamw(schedule, b2=0.95, weight_decay=0.0)
  state = opt.init(params)

  def last_logits(p, ids, segments):
    return model.apply({"params": lm_params(p)}, ids, segment_ids=segments)[:, -1]

  @jax.jit
  def step(p, s, ids, segments, answers):
    loss, g = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        last_logits(p, ids, segments), answers).mean())(p)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  @jax.jit
  def correct(p):
    lo, n = (COLOR0, len(COLORS)) if asked == "color" else (SHAPE0, len(SHAPES))
    return last_logits(p, tx, tseg)[:, lo:lo + n].argmax(-1) + lo == ty

  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  for n in range(1, STEPS.value + 1):
    b = rng.integers(len(y), size=BATCH.value)
    params, state, loss = step(params, state, x[b], seg[b], y[b])
    if n % max(STEPS.value // 10, 1) == 0:
      print(f"step {n}: loss {float(loss):.3f}, test {asked} accuracy "
            f"{float(correct(params).mean()):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
  ok = np.asarray(correct(params))
  seen = np.array([r in train_renderings for r in test_renderings])
  print(f"test {asked} accuracy, asked object's rendering in a training image: "
        + "; ".join(f"{name} {ok[m].mean():.3f} ({m.sum()} questions)" if m.any() else
                    f"{name} - (0 questions)" for name, m in (("yes", seen), ("no", ~seen))))


if __name__ == "__main__":
  app.run(main)
