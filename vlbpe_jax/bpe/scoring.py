"""The pair-scoring kernel: spatial consistency S of many candidate pairs at once.

For one pair (a, b) with offset histogram `n_delta` (how often b sits at anchor offset delta from
a), N = sum n_delta, u_bar = sum n_delta * delta / N and

  S(a, b) = (1 / N) * sum_delta n_delta * exp(-||delta - u_bar||^2 / (2 sigma^2)),

which equals the seed's (1/N_ab) sum_i exp(-||u_i - u_bar||^2 / 2 sigma^2) over occurrences i,
grouped by their (discrete) offsets. The kernel scores a padded batch `[K, D]` of histograms.

Bit-exactness: inputs are exact integers; every sum over D is an adjacent-pair tree of single
float32 additions (`x[0::2] + x[1::2]`), so zero padding at the end of a row never changes the
result, whatever D or K is. The kernel runs on the host's first CPU device so that the
same histogram gives the same bits on a CPU, GPU or TPU machine and on any mesh.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np


def _tree_sum(x):
  """Sum over the last axis (a power of two) by adjacent pairs: [K, D] -> [K]."""
  while x.shape[-1] > 1:
    x = x[..., 0::2] + x[..., 1::2]
  return x[..., 0]


@jax.jit
def pair_consistency(counts, dy, dx, sigma):
  """S per pair. counts, dy, dx: [K, D] int32 (counts 0 = padding), D a power of two.

  Returns S: [K] float32 (0 for all-padding rows).
  """
  chex.assert_rank(counts, 2)
  chex.assert_equal_shape([counts, dy, dx])
  n = counts.astype(jnp.float32)                       # [K, D]
  fy, fx = dy.astype(jnp.float32), dx.astype(jnp.float32)
  tot = _tree_sum(n)                                    # [K]
  safe = jnp.maximum(tot, 1.0)
  my = _tree_sum(n * fy) / safe                         # [K]
  mx = _tree_sum(n * fx) / safe
  d2 = (fy - my[:, None]) ** 2 + (fx - mx[:, None]) ** 2  # [K, D]
  kern = jnp.exp(-d2 / (2.0 * sigma * sigma))
  return jnp.where(tot > 0, _tree_sum(n * kern) / safe, 0.0)


def _bucket(n: int, lo: int, step: int) -> int:
  """Smallest lo * step**k >= n: few distinct kernel shapes, hence few compiles."""
  size = lo
  while size < n:
    size *= step
  return size


def score_histograms(group, d_y, d_x, counts, num_groups: int, sigma: float) -> np.ndarray:
  """S for `num_groups` pairs from flat histogram entries sorted by (group, offset).

  group: int64 [E] pair index in [0, num_groups); d_y, d_x, counts: [E]. Returns float32 [G].
  Rows and columns are padded to a few bucket sizes; runs on the first CPU device.
  """
  if num_groups == 0:
    return np.zeros(0, np.float32)
  starts = np.searchsorted(group, np.arange(num_groups))
  col = np.arange(group.size) - starts[group]
  width = _bucket(int(col.max()) + 1 if col.size else 1, 4, 4)
  rows = _bucket(num_groups, 64, 8)
  out = []
  for r0 in range(0, rows, 1 << 15):  # bounded kernel sizes (a bucket size) for huge calls
    nr = min(rows - r0, 1 << 15)
    sel = (group >= r0) & (group < r0 + nr)
    mats = [np.zeros((nr, width), np.int32) for _ in range(3)]
    for m, v in zip(mats, (counts, d_y, d_x)):
      m[group[sel] - r0, col[sel]] = v[sel]
    with jax.default_device(jax.devices("cpu")[0]):
      s = pair_consistency(*mats, np.float32(sigma))
    out.append(np.asarray(s))
  return np.concatenate(out)[:num_groups]

