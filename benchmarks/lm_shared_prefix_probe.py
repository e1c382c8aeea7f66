"""Several questions per image without the text shortcut: does a shared image prefix help?

A fresh `LM` (lm/model.py, no text pretraining) learns VQA on the demo's image tokens, at a
fixed budget of tokens per step, in one of two row formats:

- `single`: one question per row, `<img> image </img> question answer` (the evaluation's
  format); a step holds `--tokens / width` such rows.
- `shared`: one image per row followed by all of its questions, each a branch that attends to
  the image and to itself only (`LM(..., branch_ids=...)`) and whose positions restart where
  the image ends, so every question sits exactly where evaluation asks it and no answer can be
  read off an earlier one; the image tokens are paid once for all of its questions.
- `line`: the same rows as `shared` without the branches (plain causal attention, positions
  running on): the pipeline's default layout of an image's questions.

Question types: colour ("what color is the <shape>?", about an object whose shape is unique in
its image), shape ("what shape is the <colour> one?", colour unique), count ("how many?").
Every `--steps / 10` steps: test accuracy per type, each question alone after its image (the
answer restricted to its type's values), and the wrong-image control (each question after
another test image).

  python benchmarks/lm_shared_prefix_probe.py --workdir=runs/demo --format=single
  python benchmarks/lm_shared_prefix_probe.py --workdir=runs/demo --format=shared

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

from vlbpe_jax.data import shapes
from vlbpe_jax.lm.model import LM, lm_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm_colour_probe  # noqa: E402  (the demo workdir's image tokens)

# --workdir, --tokens (bpe or vq), --steps, --lr, --variant: lm_colour_probe's flags.
WORKDIR, TOKENS = lm_colour_probe.WORKDIR, lm_colour_probe.TOKENS
STEPS, LR, VARIANT = lm_colour_probe.STEPS, lm_colour_probe.LR, lm_colour_probe.VARIANT
FORMAT = flags.DEFINE_enum("format", "single", ["single", "shared", "line"], "row format")
ROWS = flags.DEFINE_integer("rows", 8, "packed rows per step")
WIDTH = flags.DEFINE_integer("width", 160, "tokens per packed row")
TYPES = flags.DEFINE_list("types", ["color", "shape", "count"], "question types trained")
SEED = flags.DEFINE_integer("seed", 0, "init and batch-order seed")

COLORS, SHAPES = list(shapes.COLORS), list(shapes.SHAPES)
# ids: 0 pad, 1 <img>, 2 </img>, 3 "?", 4 "what color is the", 5 "what shape is the",
# 6 "how many", then shapes, colours, counts 1..4, then the image tokens.
Q_IDS = {"color": 4, "shape": 5, "count": 6}
SHAPE0 = 7
COLOR0 = SHAPE0 + len(SHAPES)
COUNT0 = COLOR0 + len(COLORS)
VIS0 = COUNT0 + shapes.MAX_OBJECTS
ANSWERS = {"color": (COLOR0, len(COLORS)), "shape": (SHAPE0, len(SHAPES)),
           "count": (COUNT0, shapes.MAX_OBJECTS)}


def image_questions(objects, types):
  """`[(type, question ids, answer id)]` of one scene."""
  out = []
  for o in objects:
    if "color" in types and sum(p["shape"] == o["shape"] for p in objects) == 1:
      out.append(("color", [4, SHAPE0 + SHAPES.index(o["shape"]), 3],
                  COLOR0 + COLORS.index(o["color"])))
    if "shape" in types and sum(p["color"] == o["color"] for p in objects) == 1:
      out.append(("shape", [5, COLOR0 + COLORS.index(o["color"]), 3],
                  SHAPE0 + SHAPES.index(o["shape"])))
  if "count" in types:
    out.append(("count", [6, 3], COUNT0 + len(objects) - 1))
  return out


def scenes(split, tokens, types):
  """`[(image ids, [(type, question, answer)])]` of every image of the split."""
  out, i = [], 0
  while True:
    image = tokens(split, i)
    if image is None:
      return out
    qs = image_questions(shapes.make_scene(i, split), types)
    if qs:
      out.append(([1, *(np.asarray(image) + VIS0).tolist(), 2], qs))
    i += 1


def row(image, qs, line=False):
  """One row: ids, positions, branch ids, answer targets (-1 = no loss) of `image` + `qs`
  (`line`: branch 0 everywhere, positions running on)."""
  ids, pos, br, tgt = [0, *image], list(range(len(image) + 1)), [0] * (len(image) + 1), []
  tgt = [-1] * len(ids)
  for k, (_, q, a) in enumerate(qs, 1):
    seq = q + [a]
    start = len(ids) if line else len(image) + 1
    ids += seq
    pos += list(range(start, start + len(seq)))
    br += [0 if line else k] * len(seq)
    tgt += [-1] * (len(q) - 1) + [a, -1]  # the "?" token predicts the answer
  return ids, pos, br, tgt


def batch(rows, width):
  """Right-padded arrays of `rows`, one per row (segment 0 = padding)."""
  return pack([[r] for r in rows], width)


def pack(groups, width):
  """Arrays `[len(groups), width]`: each group's rows side by side in one row, segments 1, 2..
  (segment 0 = padding)."""
  n = len(groups)
  out = {k: np.zeros((n, width), np.int32) for k in ("ids", "pos", "br", "seg")}
  out["tgt"] = np.full((n, width), -1, np.int32)
  for r, group in enumerate(groups):
    at = 0
    for s, (ids, pos, br, tgt) in enumerate(group, 1):
      m = len(ids)
      sl = slice(at, at + m)
      out["ids"][r, sl], out["pos"][r, sl], out["br"][r, sl] = ids, pos, br
      out["seg"][r, sl], out["tgt"][r, sl] = s, tgt
      at += m
  return out


def packed_step(units, order, at, rows, width, rng, line=False):
  """The next `rows` rows of `width` tokens filled greedily with units `order[at:]`, in order
  (a unit that does not fit the rest of a row starts the next one), each unit's questions in
  an order drawn by `rng` (as the pipeline shuffles them). -> (arrays, new at)."""
  groups = []
  for _ in range(rows):
    group, used = [], 0
    while True:
      image, qs = units[order[at % len(order)]]
      r = row(image, [qs[i] for i in rng.permutation(len(qs))], line=line)
      if used + len(r[0]) > width:
        break
      group.append(r)
      used += len(r[0])
      at += 1
    groups.append(group)
  return pack(groups, width), at


def main(argv):
  del argv
  tokens, num_tokens, _ = lm_colour_probe.image_tokens(WORKDIR.value, TOKENS.value)
  types = tuple(TYPES.value)
  unknown = sorted(set(types) - set(ANSWERS))
  if unknown:
    raise ValueError(f"--types={list(types)}: {unknown} unknown; expected some of {list(ANSWERS)}")
  train, test = scenes("train", tokens, types), scenes("test", tokens, types)
  single = FORMAT.value == "single"
  units = ([(img, [q]) for img, qs in train for q in qs] if single else train)
  width = WIDTH.value
  longest = max(len(row(img, qs)[0]) for img, qs in units)
  if longest > width:
    raise ValueError(f"--width={width}: a training row has {longest} tokens; expected a "
                     "width that holds every row")
  print(f"{FORMAT.value}: {len(units)} training rows ({sum(len(q) for _, q in train)} "
        f"questions on {len(train)} images), {ROWS.value} packed rows x {width} tokens per "
        "step", flush=True)
  tests = [(img, [q]) for img, qs in test for q in qs]
  wrong = [(test[(i + 1) % len(test)][0], qs) for i, (_, qs) in enumerate(test)]
  wrong = [(img, [q]) for img, qs in wrong for q in qs]
  test_w = max(len(row(img, qs)[0]) for img, qs in tests + wrong)
  tb, wb = batch([row(*u) for u in tests], test_w), batch([row(*u) for u in wrong], test_w)
  kinds = np.array([qs[0][0] for _, qs in tests])

  kw = dict(dtype="float32")
  if VARIANT.value == "mu":
    kw.update(width=64, num_heads=4, num_kv_heads=2, mlp_dim=192)
  model = LM(lm_config(VARIANT.value, text_vocab=VIS0 + num_tokens, **kw))
  b0 = batch([row(*units[0])], width)
  params = nn.unbox(model.init(jax.random.key(SEED.value), b0["ids"])["params"])
  schedule = optax.warmup_cosine_decay_schedule(0.0, LR.value, 20, STEPS.value, LR.value * 0.1)
  opt = optax.adamw(schedule, b2=0.95, weight_decay=0.0)
  state = opt.init(params)

  def logits(p, b):
    return model.apply({"params": p}, b["ids"], positions=b["pos"], segment_ids=b["seg"],
                       branch_ids=b["br"])

  @jax.jit
  def step(p, s, b):
    def loss_fn(p):
      mask = b["tgt"] >= 0
      ce = optax.softmax_cross_entropy_with_integer_labels(logits(p, b),
                                                           jnp.maximum(b["tgt"], 0))
      return jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1)
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  @jax.jit
  def predict(p, b):
    lg = logits(p, b)  # the one answer position of each row
    at = jnp.argmax(b["tgt"] >= 0, axis=1)
    return jnp.take_along_axis(lg, at[:, None, None], axis=1)[:, 0], jnp.max(b["tgt"], axis=1)

  def accuracy(p, b):
    lg, y = (np.asarray(v) for v in predict(p, b))
    out = {}
    for t in types:
      lo, n = ANSWERS[t]
      sel = kinds == t
      out[t] = float((lg[sel, lo:lo + n].argmax(-1) + lo == y[sel]).mean())
    return out

  rng = np.random.default_rng(SEED.value)
  order, at, seen = rng.permutation(len(units)), 0, 0
  t0 = time.perf_counter()
  for n in range(1, STEPS.value + 1):
    b, at = packed_step(units, order, at, ROWS.value, width, rng, line=FORMAT.value == "line")
    seen += int((b["tgt"] >= 0).sum())
    params, state, loss = step(params, state, b)
    if n % max(STEPS.value // 10, 1) == 0:
      right, control = accuracy(params, tb), accuracy(params, wb)
      print(f"step {n}: loss {float(loss):.3f} | " + ", ".join(
          f"{t} {right[t]:.3f} / {control[t]:.3f}" for t in types) +
            f" (right / wrong image; {seen} answers seen; {time.perf_counter() - t0:.0f} s)",
            flush=True)


if __name__ == "__main__":
  app.run(main)
