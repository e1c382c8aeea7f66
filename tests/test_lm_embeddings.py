"""Text vs visual embedding rows: separation number, 2D PCA, summary and figure."""

import numpy as np
import pytest

from vlbpe_jax.lm import embeddings


def _clouds(offset, n=4000, d=16, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)), rng.normal(size=(n, d)) + offset


def test_separation_of_exact_tables():
  text = np.array([[1.0, 0.0], [-1.0, 0.0]])  # mean (0, 0), norms 1
  visual = np.array([[3.0, 1.0], [3.0, -1.0]])  # mean (3, 0), norms sqrt(10)
  want = 3.0 / ((2 + 2 * np.sqrt(10)) / 4)
  np.testing.assert_allclose(embeddings.separation(text, visual), want, rtol=1e-12)


def test_separation_of_gaussian_clouds():
  d = 16
  offset = np.zeros(d)
  offset[3] = 4.0
  text, visual = _clouds(offset, d=d)
  # E|x| of N(0, I_16) ~ sqrt(15.5); with the offset, ~ sqrt(16 + 16 - 0.5).
  want = 4.0 / ((np.sqrt(d - 0.5) + np.sqrt(d + 16 - 0.5)) / 2)
  np.testing.assert_allclose(embeddings.separation(text, visual), want, rtol=0.03)
  same = embeddings.separation(*_clouds(np.zeros(d), d=d))
  assert same < 0.05  # ~ sqrt(2 / 4000)
  # Random relabelling gives the finite-sample level, whatever the offset.
  for x in (_clouds(offset, d=d), _clouds(np.zeros(d), d=d)):
    shuffled = embeddings.shuffled_separations(*x, num=20)
    assert shuffled.shape == (20,)
    np.testing.assert_allclose(shuffled.mean(), np.sqrt(2 / 4000), rtol=0.3)
  assert embeddings.separation(text, text) == 0.0


def test_pca_first_axis_follows_the_offset():
  offset = np.zeros(16)
  offset[5] = 6.0
  text, visual = _clouds(offset)
  points, axes, var = embeddings.pca_2d(np.concatenate([text, visual]))
  assert points.shape == (8000, 2) and axes.shape == (2, 16)
  assert abs(axes[0] @ offset / 6.0) > 0.99
  # Variance along the offset 1 + 3^2, total 16 + 3^2; the next axis ~1 / 25.
  np.testing.assert_allclose(var, [10 / 25, 1 / 25], rtol=0.1)
  np.testing.assert_allclose(axes @ axes.T, np.eye(2), atol=1e-9)
  # The projections separate the clouds along PC1, and are the centred data on the axes.
  assert abs(points[:4000, 0].mean() - points[4000:, 0].mean()) > 5.0
  x = np.concatenate([text, visual])
  np.testing.assert_allclose(points, (x - x.mean(0)) @ axes.T, atol=1e-9)


def test_summary_and_figure():
  offset = np.zeros(8)
  offset[0] = 3.0
  text, visual = _clouds(offset, n=3000, d=8)
  s = embeddings.summary(text, visual[:50])
  assert s["num_text"] == 3000 and s["num_visual"] == 50
  assert len(s["pca_text"]) == embeddings.MAX_POINTS and len(s["pca_visual"]) == 50
  assert sum(s["norm_hist_text"]) == 3000 and sum(s["norm_hist_visual"]) == 50
  assert len(s["norm_edges"]) == embeddings.BINS + 1
  assert s["separation"] == embeddings.separation(text, visual[:50])
  assert s["separation_shuffled"] < s["separation"] / 3
  assert s["separation_p"] == 1 / 101  # no relabelling is as separated
  same = embeddings.summary(*_clouds(np.zeros(8), n=200, d=8))
  assert same["separation_p"] > 0.01  # one distribution: not significant at the 1% level
  img = embeddings.figure(s, "full")
  assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
  assert (img == (255, 127, 14)).all(-1).any() and (img == (31, 119, 180)).all(-1).any()


@pytest.mark.parametrize("text, visual, match", [
    (np.zeros((0, 4)), np.ones((3, 4)), "text of shape"),
    (np.ones((3, 4)), np.ones((3,)), "visual of shape"),
    (np.ones((3, 4)), np.ones((3, 5)), "text width 4 != visual width 5"),
    (np.full((3, 4), np.nan), np.ones((3, 4)), "text: expected finite"),
])
def test_bad_tables_raise(text, visual, match):
  with pytest.raises(ValueError, match=match):
    embeddings.separation(text, visual)
  with pytest.raises(ValueError, match=match):
    embeddings.shuffled_separations(text, visual)
  with pytest.raises(ValueError, match=match):
    embeddings.summary(text, visual)
