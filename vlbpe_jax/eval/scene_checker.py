"""Rule-based scene checker: recovers shapes scenes from pixels and text, scores GenEval-style.

Images: the background is the median border color; every pixel is explained as a blend of
the background and the nearest named object color (`shapes.COLORS`), and is foreground when
it is at least half object; 8-connected components of foreground pixels are objects (pure
numpy). Each component takes its majority color, the grid cell of its bounding-box centre as
position, and the (shape, size) whose rasterised template, aligned on the component's bounding
box, has the highest IoU with it. Components smaller than a third of the smallest object are
noise. Exact on ground-truth renders from 32x32 up (objects may touch below ~30).

  objs = parse_image(image)                 # [{"shape", "color", "size", "position"}, ...]
  s = score(image, objects)                 # present/shape/color/size/position/count/all_correct
  check_dir("DIR")                          # {"n", "exact", "criteria": {...}}

Text: `parse_text` reads the templates of `shapes` (captions and attribute statements);
`text_attribute_scores` gives attribute precision / recall of a text against a scene.

CLI (DIR as written by `python -m vlbpe_jax.data.shapes`), prints one JSON line:

  python -m vlbpe_jax.eval.scene_checker --data=DIR

A missing or empty scenes.jsonl, an unreadable image or a ground-truth name outside `shapes`
(shape, color, size, position) ends in one `error:` line naming it, exit code 2.
"""

import collections
import functools
import itertools
import json
import os
import re
import sys

from absl import flags
import numpy as np
from PIL import Image

from vlbpe_jax import cli
from vlbpe_jax.data import shapes

_NAMES = list(shapes.COLORS)
_OBJECT_RGB = np.array(list(shapes.COLORS.values()), np.float32)  # [P, 3]
_KEYS = ("shape", "color", "size", "position")
_ALLOWED = {"shape": tuple(shapes.SHAPES), "color": tuple(shapes.COLORS),
            "size": tuple(shapes.SIZES), "position": tuple(shapes.POSITIONS)}
CRITERIA = ("present", "shape", "color", "size", "position", "count", "all_correct")


def _segment(image):
  """Per-pixel object color and foreground mask of image [H, W, 3] uint8.

  The background is the per-channel median of the border pixels. A pixel is explained as a
  blend bg + alpha * (color - bg) of the background and the object color whose segment lies
  nearest; it is foreground when alpha >= 1/2 (so blurred or noisy edges split at half way).
  Returns (color index into shapes.COLORS [H, W] int, foreground [H, W] bool).
  """
  x = image.astype(np.float32)
  border = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])  # [4R - 4, 3]
  bg = np.median(border, axis=0)
  d = _OBJECT_RGB - bg  # [P, 3]
  v = x - bg  # [H, W, 3]
  alpha = np.clip(v @ d.T / np.maximum((d * d).sum(-1), 1.0), 0.0, 1.0)  # [H, W, P]
  resid = ((v[:, :, None, :] - alpha[..., None] * d) ** 2).sum(-1)  # [H, W, P]
  color = resid.argmin(-1)
  fg = np.take_along_axis(alpha, color[..., None], -1)[..., 0] >= 0.5
  return color, fg


def _components(mask):
  """8-connected components of mask [H, W] bool -> labels [H, W] int (-1 outside mask).

  Min-label propagation with pointer jumping; every step is a whole-array numpy op.
  """
  h, w = mask.shape
  big = h * w
  lab = np.where(mask, np.arange(big).reshape(h, w), big)
  while True:
    new = lab.copy()
    np.minimum(new[1:], lab[:-1], out=new[1:])
    np.minimum(new[:-1], lab[1:], out=new[:-1])
    rows = new.copy()  # vertical minimum; its horizontal minimum covers the diagonals
    np.minimum(new[:, 1:], rows[:, :-1], out=new[:, 1:])
    np.minimum(new[:, :-1], rows[:, 1:], out=new[:, :-1])
    new = np.where(mask, new, big)
    flat = new.ravel()
    inside = flat < big
    flat[inside] = flat[flat[inside]]  # jump to the label's own label
    if np.array_equal(new, lab):
      break
    lab = new
  return np.where(mask, lab, -1)


@functools.lru_cache(maxsize=64)
def _min_area(resolution):
  """Pixel count of the smallest object at this resolution."""
  areas = []
  for shape, size in itertools.product(shapes.SHAPES, shapes.SIZES):
    cx, cy, half = shapes.object_geometry(size, "center", resolution)
    ys, xs = np.mgrid[:resolution, :resolution]
    areas.append(shapes.shape_mask(shape, cx, cy, half, ys, xs).sum())
  return min(areas)


def _bbox_center(mask):
  ys, xs = np.nonzero(mask)
  return (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2


def _fit(comp, position, resolution, ys, xs):
  """Best (iou, shape, size) for component mask comp over the pixel window ys, xs."""
  cy, cx = _bbox_center(comp)
  best = (-1.0, None, None)
  for shape, size in itertools.product(shapes.SHAPES, shapes.SIZES):
    gx, gy, half = shapes.object_geometry(size, position, resolution)
    tmpl = shapes.shape_mask(shape, gx, gy, half, ys, xs)
    if not tmpl.any():
      continue
    ty, tx = _bbox_center(tmpl)
    if (ty, tx) != (cy, cx):  # align bounding-box centres
      tmpl = shapes.shape_mask(shape, gx + cx - tx, gy + cy - ty, half, ys, xs)
    iou = (tmpl & comp).sum() / (tmpl | comp).sum()
    if iou > best[0]:
      best = (iou, shape, size)
  return best


def _check_image(image):
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f"image shape={image.shape}; expected a square [R, R, 3] image")
  if image.dtype != np.uint8:
    raise ValueError(f"image dtype={image.dtype}; expected uint8")
  if image.shape[0] < shapes.MIN_RESOLUTION:
    raise ValueError(f"image resolution={image.shape[0]}; expected >= {shapes.MIN_RESOLUTION}")
  return image


def parse_image(image):
  """image: uint8 [R, R, 3] -> objects sorted by position, like `shapes.make_scene`."""
  image = _check_image(image)
  res = image.shape[0]
  cell = res / 3
  colors, fg = _segment(image)
  labels = _components(fg)
  ids, areas = np.unique(labels[labels >= 0], return_counts=True)
  pad = int(np.ceil(cell / 2)) + 2
  objects = []
  for lab, area in zip(ids, areas):
    if area < _min_area(res) / 3:
      continue
    comp = labels == lab
    rows, cols = np.nonzero(comp)
    y0, y1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, res)
    x0, x1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, res)
    cy, cx = (rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2
    r, c = min(int(cy // cell), 2), min(int(cx // cell), 2)
    position = shapes.POSITIONS[3 * r + c]
    ys, xs = np.mgrid[y0:y1, x0:x1]
    _, shape, size = _fit(comp[y0:y1, x0:x1], position, res, ys, xs)
    color = _NAMES[np.bincount(colors[comp], minlength=len(_NAMES)).argmax()]
    objects.append({"shape": shape, "color": color, "size": size, "position": position})
  return sorted(objects, key=lambda o: shapes.POSITIONS.index(o["position"]))


def _check_objects(objects, name="objects"):
  """A list of dicts with the keys _KEYS, every value one of `shapes`' names, or ValueError."""
  if not isinstance(objects, (list, tuple)) or not all(
      isinstance(o, dict) and all(k in o for k in _KEYS) for o in objects):
    raise ValueError(f"{name}={objects!r}; expected a list of dicts with keys {_KEYS}")
  for i, o in enumerate(objects):
    for k in _KEYS:
      if not isinstance(o[k], str) or o[k] not in _ALLOWED[k]:
        raise ValueError(f"{name}[{i}] {k}={o[k]!r} unknown; expected one of "
                         f"{list(_ALLOWED[k])}")


def _match(listed, found, keys=_KEYS):
  """For each listed object the index of its found object (or None), maximising agreement."""
  agree = [[sum(o.get(k) is not None and o.get(k) == f.get(k) for k in keys) for f in found]
           for o in listed]
  n, m = len(listed), len(found)
  if n == 0:
    return []
  cols = range(m + n)  # columns >= m: unmatched
  gain = lambda j, i: agree[i][j] if j < m else 0  # noqa: E731
  if m + n <= 9:
    best = max(itertools.permutations(cols, n),
               key=lambda p: sum(gain(j, i) for i, j in enumerate(p)))
  else:  # greedy on the largest agreements first
    best, used = [None] * n, set()
    for _, i, j in sorted(((-agree[i][j], i, j) for i in range(n) for j in range(m))):
      if best[i] is None and j not in used:
        best[i] = j
        used.add(j)
  return [j if j is not None and j < m else None for j in best]


def _key(o):
  return tuple(o[k] for k in _KEYS)


def compare(found, objects):
  """GenEval-style criteria of recovered objects `found` against the listed `objects`."""
  _check_objects(objects)
  avail = collections.Counter((f["shape"], f["color"]) for f in found)
  present = []
  for o in objects:
    present.append(avail[(o["shape"], o["color"])] > 0)
    avail[(o["shape"], o["color"])] -= 1
  match = _match(objects, found)
  mean = lambda xs: float(np.mean(xs)) if len(xs) else 1.0  # noqa: E731
  out = {"present": mean(present)}
  for k in ("shape", "color", "size", "position"):
    out[k] = mean([j is not None and found[j][k] == o[k] for o, j in zip(objects, match)])
  out["count"] = len(found) == len(objects)
  out["all_correct"] = sorted(map(_key, found)) == sorted(map(_key, objects))
  return out


def score(image, objects):
  """Scores image against the scene `objects`: criteria (CRITERIA) plus "found" objects."""
  _check_objects(objects)
  found = parse_image(image)
  return {**compare(found, objects), "found": found}


def check_dir(data_dir):
  """Scores every line of data_dir/scenes.jsonl -> {"n", "exact", "criteria": {...}}."""
  path = os.path.join(data_dir, "scenes.jsonl")
  if not os.path.exists(path):
    raise ValueError(f"data_dir={data_dir!r} has no scenes.jsonl")
  totals, n = collections.defaultdict(float), 0
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        image_path = os.path.join(data_dir, rec["image"])
        try:
          with Image.open(image_path) as im:
            image = np.asarray(im.convert("RGB"))
        except OSError as e:
          raise ValueError(f"image {image_path} cannot be read ({e})") from e
        s = score(image, rec["objects"])
      except (KeyError, TypeError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{path}:{lineno}: bad record ({e})") from e
      for k in CRITERIA:
        totals[k] += float(s[k])
      n += 1
  if not n:
    raise ValueError(f"{path} holds no scene records: expected one JSON object per line "
                     "(as `python -m vlbpe_jax.data.shapes` writes)")
  criteria = {k: totals[k] / max(n, 1) for k in CRITERIA}
  return {"n": n, "exact": criteria["all_correct"], "criteria": criteria}


# ----------------------------------------------------------------------------- text

_WORDS = re.compile(r"[a-z]+(?:-[a-z]+)*|\d+")
_ROLE = {**{s: "shape" for s in shapes.SHAPES}, **{c: "color" for c in shapes.COLORS},
         **{z: "size" for z in shapes.SIZES}}


def _sentence_mentions(words):
  """Objects mentioned in one sentence (list of words)."""
  mentions, mods, pending_pos = [], {}, None
  for i, w in enumerate(words):
    prev = words[i - 1] if i else ""
    if w in shapes.POSITIONS and prev == "the" and i >= 2 and words[i - 2] == "at":
      nxt = words[i + 1] if i + 1 < len(words) else ""
      if nxt != "there" and mentions and "position" not in mentions[-1]:
        mentions[-1]["position"] = w
      else:
        pending_pos = w
    elif _ROLE.get(w) == "shape":
      m = {"shape": w, **mods}
      if pending_pos is not None:
        m["position"], pending_pos = pending_pos, None
      mentions.append(m)
      mods = {}
    elif w in _ROLE and prev in ("is", "are") and mentions:  # predicate: "the circle is red"
      mentions[-1].setdefault(_ROLE[w], w)
    elif w in _ROLE:
      mods[_ROLE[w]] = w
    elif w in ("is", "are", "there"):
      mods = {}
  return mentions


def _compatible(a, b):
  return a["shape"] == b["shape"] and all(a[k] == b[k] for k in a.keys() & b.keys())


def parse_text(text):
  """Objects named in a caption / attribute text: dicts with the keys the text mentions.

  Within a sentence every shape noun is a new object; a later sentence about a compatible
  object (same shape, no contradicting attribute) adds to it ("the circle is red.").
  """
  if not isinstance(text, str):
    raise ValueError(f"text={text!r}; expected a str")
  text = re.sub(r"\b(top|bottom) (left|right)\b", r"\1-\2", text.lower())
  objects = []
  for sentence in re.split(r"[.!?;\n]+", text):
    merged = set()
    for m in _sentence_mentions(_WORDS.findall(sentence)):
      cands = [i for i, o in enumerate(objects) if i not in merged and _compatible(o, m)]
      if cands:
        i = max(cands, key=lambda i: (len(objects[i].keys() & m.keys()), -i))
        objects[i].update(m)
        merged.add(i)
      else:
        objects.append(dict(m))
        merged.add(len(objects) - 1)
  return objects


def text_attribute_scores(text, objects):
  """Attribute precision / recall of `text` against the scene `objects`.

  Facts are (object, attribute) pairs over shape, color, size and position. Precision: the
  share of attributes the text states that are right for the scene object it is matched to
  (0 when it states none); recall: the share of the scene's 4 * len(objects) facts stated.
  """
  _check_objects(objects)
  parsed = parse_text(text)
  match = _match(parsed, objects)
  stated = sum(len(p) for p in parsed)
  right = sum(sum(p[k] == objects[j][k] for k in p) for p, j in zip(parsed, match)
              if j is not None)
  return {"precision": right / stated if stated else 0.0,
          "recall": right / (4 * len(objects)) if objects else 1.0}


def _flag_values():
  fv = flags.FlagValues()
  flags.DEFINE_string("data", None, "Directory with scenes.jsonl and images/.", flag_values=fv,
                      required=True)
  return fv


def main(argv=None):
  """CLI entry point; argv like sys.argv (program name first)."""
  fv = _flag_values()
  try:
    fv(sys.argv if argv is None else argv)
  except flags.Error as e:
    raise ValueError(f"{e}") from e
  print(json.dumps(check_dir(fv.data)))


if __name__ == "__main__":
  cli.run_plain(main)
