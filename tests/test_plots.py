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


def test_lines_draws_every_group_and_picks_a_log_axis():
  groups = [(f"run{k}", plots.PALETTE[k], [[0, 10.0 ** -k], [5, 2.0], [9, 10.0 ** k]])
            for k in range(3)]
  img = plots.lines(groups, title="loss")
  assert img.shape == (plots.SIZE[1], plots.SIZE[0], 3)
  for _, rgb, _ in groups:
    assert (img == rgb).all(-1).sum() > 20
  flat = plots.lines([("a", plots.BLUE, [[0, 1.0], [1, 2.0]])], logy=None)
  assert not np.array_equal(flat, plots.lines([("a", plots.BLUE, [[0, 1.0], [1, 2.0]])],
                                              logy=True))
  with pytest.raises(ValueError, match="at least one, all finite"):
    plots.lines([("a", plots.BLUE, [[0, float("nan")]])])
  with pytest.raises(ValueError, match="every y > 0"):
    plots.lines([("a", plots.BLUE, [[0, 0.0], [1, 1.0]])], logy=True)
