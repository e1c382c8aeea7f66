"""The shape and colour probes' image tokens and questions, without flags (tests import it).

`benchmarks/lm_colour_probe.py` is the probe (its docstring says what each kind of token is);
this module holds what it computes before training: scenes rendered at another size and
encoded with a workdir's VQ and BPE (`rendered_tokens`), the factored oracle tokenizer
(`patch_looks_and_forms`, `factored_tokens`), what fixes an object's codes (`rendering`), and
the question rows (`questions`).
"""

import os

import numpy as np

from vlbpe_jax.bpe import VisualBPE
from vlbpe_jax.data import shapes
from vlbpe_jax.vq import tokenizer as vq_tokenizer

COLORS, SHAPES = list(shapes.COLORS), list(shapes.SHAPES)
# ids: 0 pad/bos, 1 <img>, 2 </img>, 3 the question ("what color is the" / "what shape is the"),
# 4 "?", 5.. shapes, then colours, then the image tokens.
SHAPE0 = 5
COLOR0 = SHAPE0 + len(SHAPES)
VIS0 = COLOR0 + len(COLORS)
# factored_tokens' looks: an object colour (or none) x the background.
NUM_LOOKS = (len(COLORS) + 1) * len(shapes.BACKGROUNDS)


def rendered_tokens(workdir, kind, resolution, num_train, num_test=200):
  """Like `lm_colour_probe.image_tokens`, for the first scenes of the train / test split drawn
  at `resolution` px: each in the corner of a canvas of the VQ's resolution filled with its
  background, encoded with the workdir's VQ, the corner's codes kept (exact for a VQ that codes
  each patch alone, e.g. tiny_p4_patch), then BPE-encoded (`kind="bpe"`) or raw (`"vq"`)."""
  tok = vq_tokenizer.Tokenizer.from_workdir(workdir)
  f, full = tok.downsample, tok.resolution
  if resolution % f or not f <= resolution <= full:
    raise ValueError(f"--render={resolution}: expected a multiple of the VQ's patch {f} "
                     f"from {f} to its resolution {full}")
  if kind not in ("bpe", "vq"):
    raise ValueError(f"--render with --tokens={kind}: expected bpe or vq")
  out = {}
  for split, num in (("train", num_train), ("test", num_test)):
    canvas = np.empty((num, full, full, 3), np.uint8)
    for i in range(num):
      background = shapes.scene_background(i, split)
      canvas[i] = shapes.BACKGROUNDS[background]
      canvas[i, :resolution, :resolution] = shapes.render(
          shapes.make_scene(i, split), resolution, background=background)
    codes = tok.encode(canvas)[:, :resolution // f, :resolution // f]
    if split == "train":  # the corner's codes must not read the rest of the canvas
      other = canvas[:1].copy()
      outside = np.ones((full, full), bool)
      outside[:resolution, :resolution] = False
      other[0][outside] = 255 - other[0][outside]
      if resolution < full and not np.array_equal(
          tok.encode(other)[0, :resolution // f, :resolution // f], codes[0]):
        raise ValueError(f"--render={resolution}: the workdir's VQ codes a patch from its "
                         "neighbours too; expected a patch-wise encoder (e.g. tiny_p4_patch)")
    if kind == "vq":
      out[split] = [c.reshape(-1) for c in codes]
    else:
      enc = VisualBPE.load(os.path.join(workdir, "bpe", "bpe.json")).encode(codes)
      out[split] = [t[:n] for t, n in zip(enc["tokens"], enc["lengths"])]
  aligned = resolution % 3 == 0 and (resolution // 3) % f == 0
  print(f"rendered at {resolution} px: {np.mean([len(t) for t in out['test']]):.1f} tokens "
        f"per test image; cells of whole patches: {aligned}")
  n = int(max(max(np.max(t) for t in v) for v in out.values())) + 1
  return (lambda split, i: out[split][i] if i < len(out[split]) else None), n, not aligned


def patch_looks_and_forms(image, background, patch=4):
  """A shapes render `[R, R, 3]` on `background` -> (looks `[P]`, forms: P bytes), P patches in
  raster order: look = colour index of most of the patch's object pixels (len(COLORS): none)
  x 3 + the background's index; form = its mask of object pixels, as bytes."""
  colours = np.array(list(shapes.COLORS.values()), np.int64)  # [C, 3]
  g = image.shape[0] // patch
  image = image.astype(np.int64).reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4)
  image = image.reshape(g * g, patch * patch, 3)
  fg = np.any(image != np.array(shapes.BACKGROUNDS[background]), axis=-1)  # [P, p*p]
  hits = (image[:, :, None, :] == colours[None, None]).all(-1) & fg[..., None]  # [P, p*p, C]
  colour = np.where(fg.any(1), hits.sum(1).argmax(-1), len(colours))  # [P]
  looks = colour * len(shapes.BACKGROUNDS) + list(shapes.BACKGROUNDS).index(background)
  return looks, [m.tobytes() for m in fg]


def factored_tokens(resolution, num_train, num_test=200, patch=4):
  """An oracle tokenizer that keeps colour apart from form: each `patch` x `patch` patch of
  the scenes rendered at `resolution` px is one token `look * num_forms + form`, where look =
  (the colour of most of its object pixels, or none; the background) and form = its mask of
  object pixels (pixels not of the background colour), numbered in the order the train split
  first shows them (a form the train split never shows: the last number). Returns
  `lm_colour_probe.image_tokens`' triple; the number of token ids is NUM_LOOKS x num_forms."""
  if resolution % patch or not patch <= resolution <= 256:
    raise ValueError(f"--render={resolution} with --tokens=factored: expected a multiple of "
                     f"{patch} from {patch} to 256")
  looks, masks = {}, {}
  for split, num in (("train", num_train), ("test", num_test)):
    for i in range(num):
      background = shapes.scene_background(i, split)
      image = shapes.render(shapes.make_scene(i, split), resolution, background=background)
      looks[split, i], masks[split, i] = patch_looks_and_forms(image, background, patch)
  forms = {}
  for i in range(num_train):
    for m in masks["train", i]:
      forms.setdefault(m, len(forms))
  num_forms = len(forms) + 1
  out = {key: looks[key] * num_forms + np.array([forms.get(m, num_forms - 1)
                                                  for m in masks[key]])
         for key in looks}
  aligned = resolution % 3 == 0 and (resolution // 3) % patch == 0
  print(f"factored tokens at {resolution} px: {num_forms - 1} forms in the train split, "
        f"{NUM_LOOKS} looks; cells of whole patches: {aligned}")
  return (lambda split, i: out.get((split, i))), NUM_LOOKS * num_forms, not aligned


def rendering(obj, background, with_cell=True):
  """What fixes an object's pixels (and so its codes): shape, colour, size, cell, background;
  `with_cell=False` where the cells are a whole number of VQ patches (e.g. 48 px: 16 px cells,
  four 4-px patches), so an object's codes move with it unchanged."""
  return (obj["shape"], obj["color"], obj["size"], obj["position"] if with_cell else None,
          background)


def questions(split, tokens, num, one_object, asked="color", order="image", with_cell=True):
  """`(ids [N, L], segment ids [N, L], answers [N], renderings)`, left-padded (segment 0 =
  padding); renderings: the asked objects' `rendering`s (a list of N), then the set of those of
  every object in the images read. `asked`: the attribute asked for; the object is named by the
  other one, unique in its image."""
  named = "shape" if asked == "color" else "color"
  first = {"shape": SHAPE0, "color": COLOR0}
  values = {"shape": SHAPES, "color": COLORS}
  rng = np.random.default_rng(0 if split == "train" else 1)
  rows, answers, asked_renderings, seen = [], [], [], set()
  i = 0
  while len(rows) < num:
    objects = shapes.make_scene(i, split)
    image = tokens(split, i)
    i += 1
    if image is None:
      break
    background = shapes.scene_background(i - 1, split)
    seen.update(rendering(o, background, with_cell) for o in objects)
    unique = [o for o in objects if sum(p[named] == o[named] for p in objects) == 1]
    if (one_object and len(objects) != 1) or not unique:
      continue
    o = unique[int(rng.integers(len(unique)))]
    asked_renderings.append(rendering(o, background, with_cell))
    img = [1, *(np.asarray(image) + VIS0).tolist(), 2]
    question = [3, first[named] + values[named].index(o[named]), 4]
    rows.append([0] + (img + question if order == "image" else question + img))
    answers.append(first[asked] + values[asked].index(o[asked]))
  width = max(map(len, rows))
  ids = np.array([[0] * (width - len(r)) + r for r in rows], np.int32)
  seg = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)
  return ids, seg, np.array(answers, np.int32), (asked_renderings, seen)
