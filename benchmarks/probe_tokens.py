"""The shape and colour probes' image tokens and questions, without flags (tests import it).

`benchmarks/lm_colour_probe.py` is the probe (its docstring says what each kind of token is);
this module holds what it computes before training: scenes rendered at another size and
encoded with a workdir's VQ and BPE (`rendered_tokens`), the factored oracle tokenizer
(`patch_looks_and_forms`, `factored_tokens`), its counterpart learnt from pixels
(`twotone_tokens`, vq/twotone.py), the recipe of factored rows (`composition`), what fixes an
object's codes (`rendering`), and the question rows (`questions`).
"""

import importlib.util
import os

import numpy as np

from vlbpe_jax.bpe import VisualBPE
from vlbpe_jax.data import shapes
from vlbpe_jax.vq import tokenizer as vq_tokenizer
from vlbpe_jax.vq import twotone

COLORS, SHAPES = list(shapes.COLORS), list(shapes.SHAPES)
# ids: 0 pad/bos, 1 <img>, 2 </img>, 3 the question ("what color is the" / "what shape is the"),
# 4 "?", 5.. shapes, then colours, then the image tokens.
SHAPE0 = 5
COLOR0 = SHAPE0 + len(SHAPES)
VIS0 = COLOR0 + len(COLORS)
# factored_tokens' looks: an object colour (or none) x the background.
NUM_LOOKS = (len(COLORS) + 1) * len(shapes.BACKGROUNDS)


def demo_bpe_settings():
  """The demo config's visual BPE settings (configs/tiny.py: alpha, sigma, offsets,
  min_count, s_prior_count), as `VisualBPE.learn` keywords."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "tiny.py")
  spec = importlib.util.spec_from_file_location("tiny_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  bpe = module.get_config().bpe
  return {k: bpe[k] for k in ("alpha", "sigma", "offsets", "min_count", "s_prior_count")}


def per_split(out):
  """`{split: sequence of images' tokens}` -> the getter `(split, index) -> tokens`, None past
  the split's end (the first of `lm_colour_probe.image_tokens`' values)."""
  return lambda split, i: out[split][i] if i < len(out[split]) else None


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
  return per_split(out), n, not aligned


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
  return ((lambda split, i: out.get((split, i))), NUM_LOOKS * num_forms, not aligned,
          composition(NUM_LOOKS, num_forms))


def composition(num_looks, num_forms, parts=None, joint=False):
  """The factored rows' recipe: `(C [V, K], (num_looks, num_forms, num_more))`, a token's row
  = `C[t] @ table [K, D]`, the table's rows the looks, then the forms, then `num_more` rows.
  `parts=None`: one token per (look, form), V = num_looks * num_forms, C[t] = one-hot(look) +
  one-hot(form). `parts`: per token, the `(look, form, (dy, dx))` of each cell it covers (a
  BPE token's footprint); its row is the mean over its cells of the cell's look row plus, by
  default, its form row and a row for its offset (the more rows: one per offset in `parts`),
  or with `joint`, a row for its (form, offset) pair (a form at offset (0, 0) is its form row;
  the more rows: the other pairs in `parts`), so that a token's row says which form is where."""
  if parts is None:
    ids = np.arange(num_looks * num_forms)
    c = np.zeros((len(ids), num_looks + num_forms), np.float32)
    c[ids, ids // num_forms] = 1.0
    c[ids, num_looks + ids % num_forms] = 1.0
    return c, (num_looks, num_forms, 0)
  base = num_looks + num_forms
  if joint:
    more = sorted({(f, o) for cells in parts for _, f, o in cells if o != (0, 0)})
    where = {key: base + i for i, key in enumerate(more)}
    rows = lambda look, form, o: (look, num_looks + form if o == (0, 0) else where[form, o])
  else:
    more = sorted({o for cells in parts for _, _, o in cells})
    where = {o: base + i for i, o in enumerate(more)}
    rows = lambda look, form, o: (look, num_looks + form, where[o])
  c = np.zeros((len(parts), base + len(more)), np.float32)
  for t, cells in enumerate(parts):
    for cell in cells:
      for k in rows(*cell):
        c[t, k] += 1.0 / len(cells)
  return c, (num_looks, num_forms, len(more))


def twotone_tokens(resolution, num_train, num_test=200, num_looks=64, num_forms=256,
                   merges=0, joint=False, over="codes"):
  """`factored_tokens` learnt from pixels alone: vq/twotone.py's codebooks fitted on the train
  split's scenes rendered at `resolution` px, each 4x4 patch one code `look * num_forms + form`
  (its two colours x its bitmap, the minority side 1); with `merges` > 0, a visual BPE (the
  demo's settings) learnt over those codes on the train split encodes them. Returns
  `image_tokens`' four values, the last `composition`'s recipe of factored rows (`joint`
  passed on; the codebooks' sizes those fitted: at most the ones asked).

  `over="forms"`: the BPE learns over the forms alone, so that an object's tokens do not depend
  on its colours; a token is then (a BPE token of forms, the looks of its cells), its factored
  row the form token's row + the mean of its cells' look rows (`forms_and_looks`)."""
  if over not in ("codes", "forms"):
    raise ValueError(f"over={over!r}: expected 'codes' or 'forms'")
  images = {split: shapes.make_images(split, 0, num, resolution=resolution)
            for split, num in (("train", num_train), ("test", num_test))}
  tok = twotone.TwoTone.fit(images["train"], num_looks=num_looks, num_forms=num_forms)
  codes = {split: tok.encode(x) for split, x in images.items()}  # (looks, forms) each
  grids = {split: tok.product_ids(*c) for split, c in codes.items()}
  rec = tok.decode(*codes["test"]).astype(np.float64)
  mse = np.mean((rec - images["test"]) ** 2)
  aligned = resolution % 3 == 0 and (resolution // 3) % tok.patch == 0
  base = tok.num_looks * tok.num_forms
  print(f"two-tone tokens at {resolution} px: {tok.num_looks} looks x {tok.num_forms} forms; "
        f"test PSNR {10 * np.log10(255 ** 2 / mse) if mse else np.inf:.1f} dB; cells of "
        f"whole patches: {aligned}")
  if not merges:
    out = {split: g.reshape(len(g), -1) for split, g in grids.items()}
    return (per_split(out), base,
            not aligned, composition(tok.num_looks, tok.num_forms))
  bpe_kw = dict(demo_bpe_settings(), progress=False)
  if over == "forms":
    return forms_and_looks(codes, tok.num_looks, tok.num_forms, merges, aligned, bpe_kw)
  bpe = VisualBPE.learn(grids["train"], base, merges, **bpe_kw)
  enc = {split: bpe.encode(g) for split, g in grids.items()}
  out = {split: [t[:n] for t, n in zip(e["tokens"], e["lengths"])] for split, e in enc.items()}
  parts = [[(c // tok.num_forms, c % tok.num_forms, (int(dy), int(dx)))
            for c, (dy, dx) in zip(bpe.geometry.codes(t), bpe.footprint(t))]
           for t in range(bpe.vocab_size)]
  print(f"visual BPE over them: {bpe.vocab_size - base} merges, "
        f"{np.mean([len(t) for t in out['test']]):.1f} tokens per test image")
  return (per_split(out), bpe.vocab_size,
          not aligned, composition(tok.num_looks, tok.num_forms, parts, joint))


def forms_and_looks(codes, num_looks, num_forms, merges, aligned, bpe_kw):
  """`twotone_tokens(over="forms")`: `codes` {split: (looks, forms) int [N, h, w] each}; a
  visual BPE learnt over the train split's forms encodes each split's forms, and each token
  (a BPE token of forms t at anchor (r, c)) becomes one id per distinct (t, the sorted looks of
  its cells), numbered as first met (train first). Returns `image_tokens`' four values; the
  recipe's rows: the mean of the cells' look rows + t's row (sizes: looks, BPE tokens, 0)."""
  bpe = VisualBPE.learn(codes["train"][1], num_forms, merges, **bpe_kw)
  ids, out = {}, {}
  for split in ("train", "test"):
    looks, forms = codes[split]
    enc = bpe.encode(forms)
    out[split] = []
    for i, n in enumerate(enc["lengths"]):
      row = []
      for t, (r, c) in zip(enc["tokens"][i][:n], enc["positions"][i][:n]):
        fp = bpe.footprint(int(t))
        key = (int(t), tuple(sorted(looks[i, r + fp[:, 0], c + fp[:, 1]].tolist())))
        row.append(ids.setdefault(key, len(ids)))
      out[split].append(np.array(row, np.int32))
  recipe = np.zeros((len(ids), num_looks + bpe.vocab_size), np.float32)
  for (t, cell_looks), k in ids.items():
    recipe[k, num_looks + t] = 1.0
    for look in cell_looks:
      recipe[k, look] += 1.0 / len(cell_looks)
  print(f"visual BPE over the forms: {bpe.vocab_size - num_forms} merges, "
        f"{np.mean([len(t) for t in out['test']]):.1f} tokens per test image, {len(ids)} "
        "(form token, looks) ids")
  return (per_split(out), len(ids),
          not aligned, (recipe, (num_looks, bpe.vocab_size, 0)))


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
