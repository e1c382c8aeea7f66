"""Tests of the rule-based scene checker (vlbpe_jax/eval/scene_checker.py)."""

import collections
import copy
import json

import numpy as np
import pytest

from vlbpe_jax.data import shapes
from vlbpe_jax.eval import scene_checker as sc


def _key(objects):
  return sorted(tuple(o.get(k) for k in ("shape", "color", "size", "position")) for o in objects)


def _bfs_components(mask):
  """Reference 8-connected labelling: number of components."""
  seen, count = np.zeros_like(mask), 0
  for start in zip(*np.nonzero(mask)):
    if seen[start]:
      continue
    count += 1
    queue = collections.deque([start])
    seen[start] = True
    while queue:
      y, x = queue.popleft()
      for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
          q = (y + dy, x + dx)
          if (0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q]
              and not seen[q]):
            seen[q] = True
            queue.append(q)
  return count


def test_components_match_bfs():
  rng = np.random.default_rng(0)
  for density in (0.2, 0.45, 0.6):
    mask = rng.random((23, 31)) < density
    labels = sc._components(mask)
    assert ((labels >= 0) == mask).all()
    assert len(np.unique(labels[mask])) == _bfs_components(mask)
    for lab in np.unique(labels[mask]):  # each label is one connected piece
      assert _bfs_components(labels == lab) == 1


def test_exact_recovery_on_test_split_64():
  n = 100
  exact = sum(_key(sc.parse_image(shapes.make_example(i, "test")["image"]))
              == _key(shapes.make_scene(i, "test")) for i in range(n))
  assert exact / n >= 0.99


@pytest.mark.parametrize("resolution,n", [(32, 60), (128, 20), (256, 6)])
def test_exact_recovery_other_resolutions(resolution, n):
  for i in range(n):
    ex = shapes.make_example(i, "test", seed=5, resolution=resolution)
    assert _key(sc.parse_image(ex["image"])) == _key(ex["objects"]), i


def test_score_correct_pair():
  ex = shapes.make_example(4, "test")
  s = sc.score(ex["image"], ex["objects"])
  assert s["all_correct"] and s["count"]
  assert all(s[k] == 1.0 for k in ("present", "shape", "color", "size", "position"))
  assert _key(s["found"]) == _key(ex["objects"])


def test_mismatched_pairs_rejected():
  rejected = 0
  for i in range(40):
    image = shapes.make_example(i, "test")["image"]
    other = shapes.make_scene(i + 1, "test")
    if _key(other) != _key(shapes.make_scene(i, "test")):
      assert not sc.score(image, other)["all_correct"]
      rejected += 1
  assert rejected >= 35


@pytest.mark.parametrize("field", ["shape", "color", "size", "position"])
def test_single_attribute_change_rejected(field):
  values = {"shape": shapes.SHAPES, "color": list(shapes.COLORS), "size": shapes.SIZES,
            "position": shapes.POSITIONS}[field]
  for i in range(10):
    ex = shapes.make_example(i, "test")
    objects = copy.deepcopy(ex["objects"])
    used = {o["position"] for o in objects}
    choices = [v for v in values if v != objects[0][field]
               and (field != "position" or v not in used)]
    objects[0][field] = choices[i % len(choices)]
    s = sc.score(ex["image"], objects)
    assert not s["all_correct"]
    assert s[field] < 1.0 if field != "shape" else s["present"] < 1.0 or s["shape"] < 1.0


def test_missing_and_extra_objects_fail_count():
  for i in range(10):
    ex = shapes.make_example(i, "test")
    extra = ex["objects"] + [dict(ex["objects"][0], position=p) for p in shapes.POSITIONS
                             if p not in {o["position"] for o in ex["objects"]}][:1]
    s = sc.score(ex["image"], extra)
    assert not s["count"] and not s["all_correct"] and s["present"] < 1.0
    if len(ex["objects"]) > 1:
      s = sc.score(ex["image"], ex["objects"][1:])
      assert not s["count"] and not s["all_correct"] and s["present"] == 1.0


def test_blank_image_has_no_objects():
  image = np.full((64, 64, 3), shapes.BACKGROUNDS["gray"], np.uint8)
  assert sc.parse_image(image) == []
  s = sc.score(image, shapes.make_scene(0, "test"))
  assert s["present"] == 0.0 and not s["all_correct"]


def test_mild_noise_is_tolerated():
  rng = np.random.default_rng(0)
  for i in range(20):
    ex = shapes.make_example(i, "test")
    noisy = np.clip(ex["image"] + rng.normal(0, 10, ex["image"].shape), 0, 255).astype(np.uint8)
    assert sc.score(noisy, ex["objects"])["all_correct"], i


def test_bad_inputs():
  with pytest.raises(ValueError, match="image shape"):
    sc.parse_image(np.zeros((64, 32, 3), np.uint8))
  with pytest.raises(ValueError, match="dtype"):
    sc.parse_image(np.zeros((64, 64, 3), np.float32))
  with pytest.raises(ValueError, match="objects"):
    sc.score(np.zeros((64, 64, 3), np.uint8), [{"shape": "circle"}])
  with pytest.raises(ValueError, match="scenes.jsonl"):
    sc.check_dir("/nonexistent/dir")


def test_check_dir_cli(tmp_path, capsys):
  shapes.write_split(str(tmp_path), "test", 12, seed=1)
  sc.main(["scene_checker", f"--data={tmp_path}"])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["n"] == 12 and out["exact"] == 1.0
  assert set(out["criteria"]) == set(sc.CRITERIA)
  assert all(v == 1.0 for v in out["criteria"].values())
  # Shuffle the scenes against the images: the checker must notice.
  lines = (tmp_path / "scenes.jsonl").read_text().splitlines()
  recs = [json.loads(x) for x in lines]
  for a, b in zip(recs, recs[1:] + recs[:1]):
    a["shuffled"] = b["objects"]
  (tmp_path / "scenes.jsonl").write_text(
      "".join(json.dumps(dict(r, objects=r["shuffled"])) + "\n" for r in recs))
  assert sc.check_dir(str(tmp_path))["exact"] < 0.2


def test_parse_text_round_trips_captions_and_attributes():
  for split in ("train", "test"):
    for i in range(150):
      ex = shapes.make_example(i, split)
      for caption in ex["captions"]:
        assert _key(sc.parse_text(caption)) == _key(ex["objects"]), caption
      assert _key(sc.parse_text(" ".join(ex["attributes"]))) == _key(ex["objects"])


def test_parse_text_partial_mentions():
  assert sc.parse_text("a red circle and a large star at the top left.") == [
      {"shape": "circle", "color": "red"},
      {"shape": "star", "size": "large", "position": "top-left"}]
  assert sc.parse_text("the circle is red. the circle is small.") == [
      {"shape": "circle", "color": "red", "size": "small"}]
  assert sc.parse_text("nothing to see here.") == []


def test_text_attribute_scores():
  objects = [{"shape": "circle", "color": "red", "size": "small", "position": "top-left"},
             {"shape": "square", "color": "blue", "size": "small", "position": "center"}]
  perfect = shapes.captions(objects)[1]
  assert sc.text_attribute_scores(perfect, objects) == {"precision": 1.0, "recall": 1.0}
  # circle: shape, color, position right, size wrong; star: only the color matches the square.
  s = sc.text_attribute_scores("a large red circle at the top-left and a blue star.", objects)
  assert s == {"precision": pytest.approx(4 / 6), "recall": pytest.approx(4 / 8)}
  assert sc.text_attribute_scores("hello.", objects) == {"precision": 0.0, "recall": 0.0}


def test_empty_scenes_file_is_an_error(tmp_path):
  (tmp_path / "scenes.jsonl").write_text("\n\n")
  with pytest.raises(ValueError, match="scenes.jsonl holds no scene") as e:
    sc.check_dir(str(tmp_path))
  assert str(tmp_path / "scenes.jsonl") in str(e.value)


@pytest.mark.parametrize("field,value", [("shape", "hexagon"), ("color", "mauve"),
                                         ("size", "huge"), ("position", "middle")])
def test_unknown_names_in_ground_truth_are_refused(tmp_path, field, value):
  ex = shapes.make_example(2, "test")
  objects = copy.deepcopy(ex["objects"])
  objects[-1][field] = value
  with pytest.raises(ValueError, match=f"{field}={value!r} unknown; expected one of") as e:
    sc.score(ex["image"], objects)
  allowed = {"shape": shapes.SHAPES, "color": shapes.COLORS, "size": shapes.SIZES,
             "position": shapes.POSITIONS}[field]
  assert all(name in str(e.value) for name in allowed)
  shapes.write_split(str(tmp_path), "test", 3, seed=1)
  recs = [json.loads(x) for x in (tmp_path / "scenes.jsonl").read_text().splitlines()]
  recs[1]["objects"][0][field] = value
  (tmp_path / "scenes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  with pytest.raises(ValueError, match=f"scenes.jsonl:2: .*{field}={value!r} unknown"):
    sc.check_dir(str(tmp_path))
