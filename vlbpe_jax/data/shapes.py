"""Procedural "shapes" scenes: images, captions, attributes, VQA and dialogues.

Every example is a pure function of (seed, split, index), so any host regenerates any example
without files:

  ex = shapes.make_example(12, "train", seed=0, resolution=64)
  ex["image"]     # uint8 [64, 64, 3]
  ex["objects"]   # [{"shape": "circle", "color": "red", "size": "large", "position": "top-left"}]
  ex["caption"], ex["captions"], ex["attributes"], ex["qa"], ex["dialogue"]

A scene holds 1-4 objects on a 3x3 grid (one object per cell, so they never overlap). Each
object has a shape (SHAPES), a color (COLORS), a size (SIZES, relative to the cell, so the
scene reads the same at 32 or 256 pixels) and a position (POSITIONS, row-major). Background
tones (BACKGROUNDS) are never object colors, so `vlbpe_jax.eval.scene_checker` can segment.
Rendering is crisp (no anti-aliasing): every object pixel has exactly its named color.

Held-out compositions (`heldout_compositions()`): these (color, shape) pairs never occur in a
train or validation image or text (existence questions included), and at least one of them
occurs in about two thirds of the test scenes:

  red star, green triangle, blue circle, yellow cross,
  purple square, orange diamond, cyan cross, pink circle

CLI (writes DIR/images/00000.png ... and DIR/scenes.jsonl, one JSON object per line with keys
image, objects, caption, qa, dialogue, plus captions, attributes and background):

  python -m vlbpe_jax.data.shapes --split=test --num=200 --outdir=DIR [--seed=0 --resolution=64]
"""

import functools
import itertools
import json
import os
import sys

from absl import flags
import numpy as np
from PIL import Image

from vlbpe_jax import cli

SHAPES = ("square", "circle", "triangle", "diamond", "cross", "star")
COLORS = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (40, 80, 230),
    "yellow": (245, 225, 40),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
    "cyan": (40, 210, 220),
    "pink": (250, 130, 200),
}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (120, 120, 120), "white": (255, 255, 255)}
SIZES = ("small", "large")
SIZE_SCALE = {"small": 0.55, "large": 0.88}  # object extent / cell width; gap >= 1 px at 32
POSITIONS = ("top-left", "top", "top-right", "left", "center", "right",
             "bottom-left", "bottom", "bottom-right")
SPLITS = ("train", "validation", "test")
MAX_OBJECTS = 4
MIN_RESOLUTION = 16  # renders; the scene checker is exact from 32 up

_HELDOUT = (("red", "star"), ("green", "triangle"), ("blue", "circle"), ("yellow", "cross"),
            ("purple", "square"), ("orange", "diamond"), ("cyan", "cross"), ("pink", "circle"))
_ALL_PAIRS = tuple(itertools.product(COLORS, SHAPES))
_SEEN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in _HELDOUT)
_P_FORCE_HELDOUT = 0.5  # test split: chance that the first object is a held-out pair


def _star(points=5, inner=0.45):
  ang = -np.pi / 2 + np.arange(2 * points) * np.pi / points
  r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
  xy = np.stack([r * np.cos(ang), r * np.sin(ang)], -1)
  return xy - [0.0, (xy[:, 1].max() + xy[:, 1].min()) / 2]  # centre the bounding box


_T = 0.34  # half thickness of the cross arms
_POLYGONS = {
    "square": np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]),
    "triangle": np.array([[0.0, -0.9], [1.0, 0.9], [-1.0, 0.9]]),
    "diamond": np.array([[0.0, -1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]),
    "cross": np.array([[-_T, -1], [_T, -1], [_T, -_T], [1, -_T], [1, _T], [_T, _T], [_T, 1],
                       [-_T, 1], [-_T, _T], [-1, _T], [-1, -_T], [-_T, -_T]]),
    "star": _star(),
}


def heldout_compositions():
  """(color, shape) pairs absent from train/validation images and text, present in test."""
  return list(_HELDOUT)


def _check_split(split):
  if split not in SPLITS:
    raise ValueError(f"split={split!r} unknown; expected one of {SPLITS}")


def _check_resolution(resolution):
  if int(resolution) != resolution or resolution < MIN_RESOLUTION:
    raise ValueError(f"resolution={resolution!r}; expected an int >= {MIN_RESOLUTION}")


def _rng(seed, split, index, stream):
  """Independent generator per (seed, split, index, stream); stable across hosts."""
  _check_split(split)
  if int(index) != index or index < 0:
    raise ValueError(f"index={index!r}; expected a non-negative int")
  entropy = [int(seed) & 0xFFFFFFFF, SPLITS.index(split), int(index), stream]
  return np.random.default_rng(np.random.SeedSequence(entropy))


def shape_mask(shape, cx, cy, half, ys, xs):
  """Rasterises one shape: True where the pixel centre (ys + .5, xs + .5) lies inside.

  cx, cy: centre in pixels; half: half the extent in pixels; ys, xs: integer pixel grids of
  any (broadcastable) shape. The renderer and the scene checker share this function.
  """
  if shape not in SHAPES:
    raise ValueError(f"shape={shape!r} unknown; expected one of {SHAPES}")
  u = (np.asarray(xs) + 0.5 - cx) / half
  v = (np.asarray(ys) + 0.5 - cy) / half
  if shape == "circle":
    return u * u + v * v <= 1.0
  poly = _POLYGONS[shape]
  inside = np.zeros(np.broadcast(u, v).shape, bool)
  for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):  # even-odd ray casting
    crosses = (y1 > v) != (y2 > v)
    if y1 == y2:
      continue
    x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
    inside ^= crosses & (u < x_at)
  return inside


def object_geometry(size, position, resolution):
  """(cx, cy, half) in pixels of an object of `size` at `position` on a resolution^2 image."""
  if size not in SIZE_SCALE:
    raise ValueError(f"size={size!r} unknown; expected one of {SIZES}")
  if position not in POSITIONS:
    raise ValueError(f"position={position!r} unknown; expected one of {POSITIONS}")
  row, col = divmod(POSITIONS.index(position), 3)
  cell = resolution / 3
  return (col + 0.5) * cell, (row + 0.5) * cell, SIZE_SCALE[size] * cell / 2


@functools.lru_cache(maxsize=4096)
def _object_mask(shape, size, position, resolution):
  """(y0, x0, mask) of one object, mask cropped to its cell; read-only (cached)."""
  cx, cy, half = object_geometry(size, position, resolution)
  y0, x0 = int(np.floor(cy - half)), int(np.floor(cx - half))
  n = int(np.ceil(2 * half)) + 2
  ys, xs = np.mgrid[y0:y0 + n, x0:x0 + n]
  mask = shape_mask(shape, cx, cy, half, ys, xs)
  mask.setflags(write=False)
  return y0, x0, mask


def render(objects, resolution=64, *, background=None):
  """Draws objects. background: a BACKGROUNDS name (default black). -> uint8 [R, R, 3]."""
  _check_resolution(resolution)
  background = "black" if background is None else background
  if background not in BACKGROUNDS:
    raise ValueError(f"background={background!r} unknown; expected one of {list(BACKGROUNDS)}")
  image = np.empty((resolution, resolution, 3), np.uint8)
  image[...] = BACKGROUNDS[background]
  for obj in objects:
    if obj.get("color") not in COLORS:
      raise ValueError(f"object color={obj.get('color')!r}; expected one of {list(COLORS)}")
    y0, x0, mask = _object_mask(obj.get("shape"), obj.get("size"), obj.get("position"),
                                resolution)
    h, w = mask.shape
    window = image[max(y0, 0):y0 + h, max(x0, 0):x0 + w]
    mask = mask[max(-y0, 0):, max(-x0, 0):][:window.shape[0], :window.shape[1]]
    window[mask] = COLORS[obj["color"]]
  return image


def make_scene(index, split, *, seed=0):
  """1-4 objects in distinct cells, sorted by position (row-major)."""
  rng = _rng(seed, split, index, 0)
  n = int(rng.integers(1, MAX_OBJECTS + 1))
  cells = sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist())
  pairs = _ALL_PAIRS if split == "test" else _SEEN_PAIRS
  force = split == "test" and rng.random() < _P_FORCE_HELDOUT
  forced_slot = int(rng.integers(n))
  objects = []
  for slot, cell in enumerate(cells):
    source = _HELDOUT if force and slot == forced_slot else pairs
    color, shape = source[int(rng.integers(len(source)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    objects.append({"shape": shape, "color": color, "size": size, "position": POSITIONS[cell]})
  return objects


def scene_background(index, split, *, seed=0):
  """The background tone of example (seed, split, index)."""
  rng = _rng(seed, split, index, 1)
  return list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]


# ----------------------------------------------------------------------------- text


def noun_phrase(obj, *, position=True):
  """'a large red circle at the top-left'."""
  np_ = f"a {obj['size']} {obj['color']} {obj['shape']}"
  return f"{np_} at the {obj['position']}" if position else np_


def _a(word):
  return ("an " if word[0] in "aeiou" else "a ") + word


def _join(items):
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _count_phrase(n):
  return "there is 1 object" if n == 1 else f"there are {n} objects"


def captions(objects):
  """Every caption template, in a fixed order."""
  listing = _join([noun_phrase(o) for o in objects])
  clauses = _join([f"at the {o['position']} there is {noun_phrase(o, position=False)}"
                   for o in objects])
  return [f"{listing}.", f"{_count_phrase(len(objects))}: {listing}.",
          f"a picture of {listing}.", f"{clauses}."]


def _ref(obj, objects, *, avoid):
  """Shortest unambiguous reference to obj that hides attribute `avoid` (None if none)."""
  def unique(keys):
    return sum(all(o[k] == obj[k] for k in keys) for o in objects) == 1
  if avoid != "shape" and unique(["shape"]):
    return f"the {obj['shape']}"
  if avoid not in ("shape", "color") and unique(["color", "shape"]):
    return f"the {obj['color']} {obj['shape']}"
  if avoid != "position":
    return f"the {obj['shape']} at the {obj['position']}"
  if unique(["size", "color", "shape"]):
    return f"the {obj['size']} {obj['color']} {obj['shape']}"
  return None


def attributes(objects):
  """Attribute statements: count, then color/size/position of every object."""
  out = [_count_phrase(len(objects)) + "."]
  for o in objects:
    out.append(f"{_ref(o, objects, avoid='color')} is {o['color']}.")
    out.append(f"{_ref(o, objects, avoid='size')} is {o['size']}.")
    ref = _ref(o, objects, avoid="position")
    if ref is not None:
      out.append(f"{ref} is at the {o['position']}.")
  return out


def swap_attribute(objects, attribute, split, rng):
  """A copy of `objects` with one object's `attribute` ("shape" | "color") changed to another
  value: the scene a hard-negative caption describes (it differs from the image in exactly
  that word). Outside the test split the new (color, shape) pair is never a held-out one, so
  negatives keep the held-out compositions out of training text as well."""
  if attribute not in ("shape", "color"):
    raise ValueError(f"attribute={attribute!r}: expected 'shape' or 'color'")
  _check_split(split)
  if not objects:
    raise ValueError("objects: expected a scene with at least one object")
  allowed = set(_ALL_PAIRS if split == "test" else _SEEN_PAIRS)
  values = SHAPES if attribute == "shape" else tuple(COLORS)
  choices = [(i, v) for i, o in enumerate(objects) for v in values if v != o[attribute]
             and ((v, o["shape"]) if attribute == "color" else (o["color"], v)) in allowed]
  i, v = choices[int(rng.integers(len(choices)))]
  out = [dict(o) for o in objects]
  out[i][attribute] = v
  return out


def _absent_pair(objects, split, rng):
  present = {(o["color"], o["shape"]) for o in objects}
  pairs = _ALL_PAIRS if split == "test" else _SEEN_PAIRS
  absent = [p for p in pairs if p not in present]
  return absent[int(rng.integers(len(absent)))]


# The templates of `questions`, by what they ask: (name, question prefix, chance of a guess
# that knows the answer set but not the image).
QUESTION_TYPES = (
    ("count", "how many objects", 1 / MAX_OBJECTS),
    ("color", "what color", 1 / len(COLORS)),
    ("shape", "what shape", 1 / len(SHAPES)),
    ("size", "what size", 1 / len(SIZES)),
    ("position", "where is", 1 / len(POSITIONS)),
    ("color_count", "how many ", 1 / (MAX_OBJECTS + 1)),
    ("existence", "is there", 1 / 2),
)
# Every answer each type can have (an answer outside it is a format error, right or wrong image).
ANSWERS = {
    "count": tuple(str(n) for n in range(1, MAX_OBJECTS + 1)),
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "color_count": tuple(str(n) for n in range(MAX_OBJECTS + 1)),
    "existence": ("yes", "no"),
}


def question_type(question: str) -> str:
  """The `QUESTION_TYPES` name of a question made by `questions`."""
  for name, prefix, _ in QUESTION_TYPES:
    if question.startswith(prefix):
      return name
  raise ValueError(f"question {question!r}: expected one of the templates of "
                   f"shapes.questions (prefixes {[p for _, p, _ in QUESTION_TYPES]})")


def questions(objects, split, rng):
  """Color, shape, size, count, position and existence questions with 1-2 word answers."""
  pick = lambda: objects[int(rng.integers(len(objects)))]  # noqa: E731
  qa = [{"q": "how many objects are there?", "a": str(len(objects))}]
  o = pick()
  qa.append({"q": f"what color is {_ref(o, objects, avoid='color')}?", "a": o["color"]})
  o = pick()
  qa.append({"q": f"what shape is at the {o['position']}?", "a": o["shape"]})
  o = pick()
  qa.append({"q": f"what size is {_ref(o, objects, avoid='size')}?", "a": o["size"]})
  o = pick()
  if sum(p["color"] == o["color"] and p["shape"] == o["shape"] for p in objects) == 1:
    qa.append({"q": f"where is the {o['color']} {o['shape']}?", "a": o["position"]})
  color = list(COLORS)[int(rng.integers(len(COLORS)))]
  qa.append({"q": f"how many {color} objects are there?",
             "a": str(sum(p["color"] == color for p in objects))})
  if rng.random() < 0.5:
    o = pick()
    qa.append({"q": f"is there {_a(o['color'])} {o['shape']}?", "a": "yes"})
  else:
    color, shape = _absent_pair(objects, split, rng)
    qa.append({"q": f"is there {_a(color)} {shape}?", "a": "no"})
  return qa


def dialogue(objects, caption, rng):
  """2-4 human/gpt exchanges; later questions say 'it' for the object asked about first."""
  o = objects[int(rng.integers(len(objects)))]
  same = sum(p["color"] == o["color"] for p in objects) - 1
  flows = [
      [(f"what shape is at the {o['position']}?", o["shape"]),
       ("what color is it?", o["color"]), ("is it large or small?", o["size"]),
       ("how many other objects are there?", str(len(objects) - 1))],
      [("describe the image.", caption),
       (f"what is at the {o['position']}?", noun_phrase(o, position=False)),
       ("what size is it?", o["size"]),
       ("is there another object of the same color?", "yes" if same else "no")],
      [("how many objects are there?", str(len(objects))),
       (f"what color is the object at the {o['position']}?", o["color"]),
       ("what shape is it?", o["shape"]), ("where is it?", o["position"])],
  ]
  flow = flows[int(rng.integers(len(flows)))]
  turns = flow[:int(rng.integers(2, 5))]
  return [m for q, a in turns for m in ({"from": "human", "value": q},
                                        {"from": "gpt", "value": a})]


def make_example(index, split, *, seed=0, resolution=64):
  """Image, scene and texts of example (seed, split, index); see the module docstring."""
  objects = make_scene(index, split, seed=seed)
  background = scene_background(index, split, seed=seed)
  rng = _rng(seed, split, index, 2)
  caps = captions(objects)
  caption = caps[int(rng.integers(len(caps)))]
  return {
      "image": render(objects, resolution, background=background),
      "objects": objects,
      "background": background,
      "caption": caption,
      "captions": caps,
      "attributes": attributes(objects),
      "qa": questions(objects, split, rng),
      "dialogue": dialogue(objects, caption, rng),
  }


def make_images(split, start, num, *, seed=0, resolution=64):
  """Images of examples start .. start+num-1 -> uint8 [num, R, R, 3]."""
  _check_resolution(resolution)
  if int(num) != num or num < 0:
    raise ValueError(f"num={num!r}; expected a non-negative int")
  out = np.empty((num, resolution, resolution, 3), np.uint8)
  for i in range(num):
    out[i] = render(make_scene(start + i, split, seed=seed), resolution,
                    background=scene_background(start + i, split, seed=seed))
  return out


def write_split(outdir, split, num, *, seed=0, resolution=64):
  """Writes outdir/images/%05d.png and outdir/scenes.jsonl; returns the jsonl path."""
  os.makedirs(os.path.join(outdir, "images"), exist_ok=True)
  path = os.path.join(outdir, "scenes.jsonl")
  with open(path, "w") as f:
    for i in range(num):
      ex = make_example(i, split, seed=seed, resolution=resolution)
      name = f"images/{i:05d}.png"
      Image.fromarray(ex.pop("image")).save(os.path.join(outdir, name))
      f.write(json.dumps({"image": name, **ex}) + "\n")
  return path


def _flag_values():
  fv = flags.FlagValues()
  flags.DEFINE_enum("split", "test", SPLITS, "Which split.", flag_values=fv)
  flags.DEFINE_integer("num", 200, "Number of examples (indices 0 .. num-1).", flag_values=fv)
  flags.DEFINE_string("outdir", None, "Output directory.", flag_values=fv, required=True)
  flags.DEFINE_integer("seed", 0, "Dataset seed.", flag_values=fv)
  flags.DEFINE_integer("resolution", 64, "Image side in pixels.", flag_values=fv)
  return fv


def main(argv=None):
  """CLI entry point; argv like sys.argv (program name first)."""
  fv = _flag_values()
  fv(sys.argv if argv is None else argv)
  path = write_split(fv.outdir, fv.split, fv.num, seed=fv.seed, resolution=fv.resolution)
  print(path)


if __name__ == "__main__":
  cli.run_plain(main)
