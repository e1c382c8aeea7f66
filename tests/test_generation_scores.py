"""GenEval-style scores, diversity and the Fréchet distance of eval/generation.py."""

import numpy as np
import pytest
import scipy.linalg

from vlbpe_jax.data import shapes
from vlbpe_jax.eval import generation


def _scene(i):
  return shapes.make_scene(i, "test", seed=0)


def test_geneval_real_renders_score_one_and_blank_scores_zero():
  scenes = [_scene(i) for i in range(6)]
  images = np.stack([shapes.render(s, 64) for s in scenes])
  s = generation.geneval(images, scenes)
  assert s["n"] == 6
  for k in generation.CRITERIA + ("overall", "exact"):
    assert s[k] == 1.0, k
  blank = np.zeros_like(images)
  b = generation.geneval(blank, scenes)
  assert b["object"] == 0.0 and b["count"] == 0.0 and b["overall"] == 0.0


def test_geneval_wrong_colour_costs_colour_only():
  scene = [{"shape": "circle", "color": "red", "size": "large", "position": "center"}]
  wrong = [{**scene[0], "color": "blue"}]
  r = generation.image_scores(shapes.render(wrong, 64), scene)
  assert (r["object"], r["colour"], r["count"], r["position"]) == (1.0, 0.0, 1.0, 1.0)
  assert r["overall"] == 0.75 and r["exact"] == 0.0


def test_geneval_rejects_mismatched_lengths():
  with pytest.raises(ValueError, match="one scene per image"):
    generation.geneval(np.zeros((2, 64, 64, 3), np.uint8), [_scene(0)])


def test_wrong_prompt_control():
  scenes = [_scene(i) for i in range(6)]
  real = np.stack([shapes.render(s, 64) for s in scenes])[:, None]  # [P, 1, ...]
  c = generation.wrong_prompt_control(real, scenes)
  want = np.mean([generation.image_scores(real[i, 0], scenes[(i + 1) % 6])["overall"]
                  for i in range(6)])
  assert c["n"] == 6 and c["overall"] == pytest.approx(want) and c["overall"] < 0.9
  # A model that ignores its prompt (one image for all) scores exactly its control.
  same = np.repeat(real[:1], 6, axis=0)
  assert generation.wrong_prompt_control(same, scenes)["overall"] == pytest.approx(
      generation.geneval(same[:, 0], scenes)["overall"])
  assert generation.wrong_prompt_control(real[:1], scenes[:1]) is None
  with pytest.raises(ValueError, match="one scene per prompt"):
    generation.wrong_prompt_control(real[:, 0], scenes)


def test_diversity():
  same = np.ones((3, 4, 5))
  assert generation.diversity(same) == 0.0
  f = np.zeros((1, 2, 2))
  f[0, 1] = [3.0, 4.0]
  assert generation.diversity(f) == pytest.approx(5.0)
  with pytest.raises(ValueError, match="samples >= 2"):
    generation.diversity(np.zeros((3, 1, 4)))


def test_frechet_distance_matches_scipy_and_mean_shift():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
  y = rng.normal(size=(300, 5)) * 2.0 + 1.0
  sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  ref = (np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(sx + sy)
         - 2 * np.trace(scipy.linalg.sqrtm(sx @ sy).real))
  assert generation.frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)
  assert generation.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
  assert generation.frechet_distance(x, x + 3.0) == pytest.approx(5 * 9.0, rel=1e-6)
