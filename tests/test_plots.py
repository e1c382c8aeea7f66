"""PIL report plots: panel sizes, colours drawn, bad inputs."""

import numpy as np
import pytest

from vlbpe_jax.eval import plots


def test_scatter_and_histogram_draw_their_groups():
  img = plots.scatter([("a", plots.BLUE, [[0, 0], [1, 1]]), ("b", plots.ORANGE, [[2, 0]])])
  assert img.shape == (plots.SIZE[1], plots.SIZE[0], 3) and img.dtype == np.uint8
  assert (img == plots.BLUE).all(-1).any() and (img == plots.ORANGE).all(-1).any()
  img = plots.histogram([0, 1, 2], [("a", plots.BLUE, [0.5, 0.5]), ("b", plots.ORANGE, [1, 0])])
  assert img.shape == (plots.SIZE[1], plots.SIZE[0], 3)
  assert (img == plots.ORANGE).all(-1).sum() > (img == plots.BLUE).all(-1).sum() / 2


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="at least one point"):
    plots.scatter([("a", plots.BLUE, np.zeros((0, 2)))])
  with pytest.raises(ValueError, match="K \\+ 1 edges"):
    plots.histogram([0, 1, 2], [("a", plots.BLUE, [1.0])])
