"""Tests of the procedural shapes dataset (vlbpe_jax/data/shapes.py)."""

import json
import re

import numpy as np
from PIL import Image
import pytest

from vlbpe_jax.data import shapes

_HELDOUT = shapes.heldout_compositions()


def _texts(ex):
  """Every string of an example."""
  return ([ex["caption"], *ex["captions"], *ex["attributes"]]
          + [s for qa in ex["qa"] for s in (qa["q"], qa["a"])]
          + [m["value"] for m in ex["dialogue"]])


def test_vocabulary_sizes():
  assert len(shapes.SHAPES) >= 6 and len(shapes.COLORS) >= 8 and len(shapes.SIZES) >= 2
  assert len(shapes.POSITIONS) == 9 and shapes.SPLITS == ("train", "validation", "test")
  assert not set(shapes.COLORS.values()) & set(shapes.BACKGROUNDS.values())
  rgb = np.array(list(shapes.COLORS.values()) + list(shapes.BACKGROUNDS.values()), float)
  dist = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1)) + 1e9 * np.eye(len(rgb))
  assert dist.min() > 60, "named colors must be well separated"


def test_deterministic_and_varied():
  a = shapes.make_example(7, "train", seed=3)
  b = shapes.make_example(7, "train", seed=3)
  np.testing.assert_array_equal(a.pop("image"), b.pop("image"))
  assert a == b
  others = [shapes.make_example(7, "train", seed=4), shapes.make_example(8, "train", seed=3),
            shapes.make_example(7, "validation", seed=3)]
  assert all(o["objects"] != a["objects"] for o in others)
  batch = shapes.make_images("validation", 5, 4, seed=1, resolution=32)
  for i in range(4):
    np.testing.assert_array_equal(
        batch[i], shapes.make_example(5 + i, "validation", seed=1, resolution=32)["image"])


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_scene_constraints(split):
  counts = set()
  for i in range(200):
    objs = shapes.make_scene(i, split)
    counts.add(len(objs))
    positions = [o["position"] for o in objs]
    assert len(set(positions)) == len(positions), "one object per cell"
    assert positions == sorted(positions, key=shapes.POSITIONS.index)
    for o in objs:
      assert set(o) == {"shape", "color", "size", "position"}
      assert o["shape"] in shapes.SHAPES and o["color"] in shapes.COLORS
      assert o["size"] in shapes.SIZES
  assert counts == {1, 2, 3, 4}


@pytest.mark.parametrize("resolution", [32, 64])
def test_objects_never_touch(resolution):
  """Pixels of different objects are never 8-neighbours, so segmentation can split them."""
  for i in range(100):
    objs = shapes.make_scene(i, "test")
    owner = np.full((resolution, resolution), -1)
    for k, o in enumerate(objs):
      mask = shapes.render([o], resolution).any(-1)
      assert mask.any() and (owner[mask] == -1).all(), "objects overlap"
      owner[mask] = k
    padded = np.pad(owner, 1, constant_values=-1)
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        nb = padded[1 + dy:1 + dy + resolution, 1 + dx:1 + dx + resolution]
        assert not ((owner >= 0) & (nb >= 0) & (nb != owner)).any(), "objects touch"


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_render_resolutions(resolution):
  ex = shapes.make_example(3, "test", resolution=resolution)
  image = ex["image"]
  assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
  colors = {tuple(c) for c in image.reshape(-1, 3)}
  expected = {shapes.COLORS[o["color"]] for o in ex["objects"]}
  assert colors == expected | {shapes.BACKGROUNDS[ex["background"]]}, "crisp, named colors"


def test_heldout_absent_from_train_and_validation():
  assert 6 <= len(_HELDOUT) <= 8
  assert {c for c, _ in _HELDOUT} <= set(shapes.COLORS)
  assert len({s for _, s in _HELDOUT}) >= 5
  phrases = [re.compile(rf"\b{c} {s}\b") for c, s in _HELDOUT]
  for split in ("train", "validation"):
    for i in range(300):
      ex = shapes.make_example(i, split, resolution=32)
      assert not {(o["color"], o["shape"]) for o in ex["objects"]} & set(_HELDOUT)
      for text in _texts(ex):
        assert not any(p.search(text) for p in phrases), (split, i, text)


def test_heldout_present_in_test():
  seen, with_heldout = set(), 0
  for i in range(400):
    pairs = {(o["color"], o["shape"]) for o in shapes.make_scene(i, "test")} & set(_HELDOUT)
    seen |= pairs
    with_heldout += bool(pairs)
  assert with_heldout / 400 >= 0.3
  assert seen == set(_HELDOUT)


def test_texts():
  for i in range(100):
    ex = shapes.make_example(i, "train", resolution=32)
    assert ex["caption"] in ex["captions"] and len(ex["captions"]) >= 3
    n = len(ex["objects"])
    assert ex["attributes"][0] in (f"there are {n} objects.", "there is 1 object.")
    for o in ex["objects"]:
      assert shapes.noun_phrase(o) in ex["captions"][0]
    for t in _texts(ex):
      assert t == t.lower()
    for qa in ex["qa"]:
      assert qa["q"].endswith("?") and 1 <= len(qa["a"].split()) <= 2
    roles = [m["from"] for m in ex["dialogue"]]
    assert len(roles) in (4, 6, 8) and roles == ["human", "gpt"] * (len(roles) // 2)
  answers = {qa["q"]: qa["a"] for qa in shapes.make_example(0, "test")["qa"]}
  assert answers["how many objects are there?"] == str(len(shapes.make_scene(0, "test")))
  assert any(m["value"].endswith(" it?") for i in range(20)
             for m in shapes.make_example(i, "train")["dialogue"][2:])


def test_question_types_cover_every_template():
  seen = {}
  for i in range(200):
    for qa in shapes.make_example(i, "test", resolution=32)["qa"]:
      seen.setdefault(shapes.question_type(qa["q"]), set()).add(qa["a"])
  assert set(seen) == {name for name, _, _ in shapes.QUESTION_TYPES}
  assert seen["existence"] == {"yes", "no"} and seen["size"] == set(shapes.SIZES)
  assert seen["count"] <= {"1", "2", "3", "4"} and "0" in seen["color_count"]
  assert all(seen[name] <= set(shapes.ANSWERS[name]) for name in seen)
  assert len(shapes.ANSWERS["color"]) == round(1 / dict(
      (n, c) for n, _, c in shapes.QUESTION_TYPES)["color"])
  with pytest.raises(ValueError, match="templates"):
    shapes.question_type("why is the sky blue?")


def test_bad_inputs():
  with pytest.raises(ValueError, match="split"):
    shapes.make_scene(0, "dev")
  with pytest.raises(ValueError, match="resolution"):
    shapes.render([], 8)
  with pytest.raises(ValueError, match="index"):
    shapes.make_scene(-1, "train")
  with pytest.raises(ValueError, match="background"):
    shapes.render([], 32, background="plaid")
  with pytest.raises(ValueError, match="shape"):
    shapes.render([{"shape": "blob", "color": "red", "size": "small", "position": "top"}])


def test_cli_writes_documented_format(tmp_path):
  shapes.main(["shapes", "--split=test", "--num=5", f"--outdir={tmp_path}", "--seed=2",
               "--resolution=48"])
  lines = (tmp_path / "scenes.jsonl").read_text().splitlines()
  assert len(lines) == 5
  for i, line in enumerate(lines):
    rec = json.loads(line)
    assert {"image", "objects", "caption", "qa", "dialogue"} <= set(rec)
    assert rec["image"] == f"images/{i:05d}.png"
    ex = shapes.make_example(i, "test", seed=2, resolution=48)
    assert rec["objects"] == ex["objects"] and rec["caption"] == ex["caption"]
    assert rec["qa"] == ex["qa"] and rec["dialogue"] == ex["dialogue"]
    assert all(set(q) == {"q", "a"} for q in rec["qa"])
    with Image.open(tmp_path / rec["image"]) as im:
      np.testing.assert_array_equal(np.asarray(im), ex["image"])
