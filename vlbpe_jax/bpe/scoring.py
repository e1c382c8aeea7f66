"""The pair-scoring kernel: spatial consistency S of many candidate pairs at once.

For one pair (a, b) with offset histogram `n_delta` (how often b sits at anchor offset delta from
a), N = sum n_delta, u_bar = sum n_delta * delta / N and

  S(a, b) = (1 / N) * sum_delta n_delta * exp(-||delta - u_bar||^2 / (2 sigma^2)),

which equals the seed's (1/N_ab) sum_i exp(-||u_i - u_bar||^2 / 2 sigma^2) over occurrences i,
grouped by their (discrete) offsets. The host computes the sufficient statistics exactly:
||delta - u_bar||^2 = q / N^2 with the integer q = ||N delta - sum n delta'||^2; the jitted
kernel scores a padded batch `[K, D]` of (n, q / N^2) rows.

Bit-exactness: the kernel's inputs are exact functions of the integer histogram, each row is put
in a canonical order (by n, then distance), and every sum over D is an adjacent-pair tree of
single float32 additions (`x[0::2] + x[1::2]`), so zero padding never changes a result, whatever
D or K is. Two histograms of the same shape (equal up to a shift, mirror or transpose of the
offsets) therefore get bit-identical S and tie exactly. The kernel runs on the host's first CPU
device, so a histogram gives the same bits on a CPU, GPU or TPU machine and on any mesh.
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
def pair_consistency(counts, dist2, sigma):
  """S per pair. counts: [K, D] int32 (0 = padding); dist2: [K, D] float32, ||delta - u_bar||^2.

  D is a power of two. Returns S: [K] float32 (0 for all-padding rows).
  """
  chex.assert_rank(counts, 2)
  chex.assert_equal_shape([counts, dist2])
  n = counts.astype(jnp.float32)                        # [K, D]
  tot = _tree_sum(n)                                     # [K]
  kern = jnp.exp(-dist2 / (2.0 * sigma * sigma))         # [K, D]
  return jnp.where(tot > 0, _tree_sum(n * kern) / jnp.maximum(tot, 1.0), 0.0)


def _bucket(n: int, lo: int, step: int) -> int:
  """Smallest lo * step**k >= n: few distinct kernel shapes, hence few compiles."""
  size = lo
  while size < n:
    size *= step
  return size


def score_histograms(group, d_y, d_x, counts, num_groups: int, sigma: float) -> np.ndarray:
  """S for `num_groups` pairs from flat histogram entries sorted by pair.

  group: int64 [E] pair index in [0, num_groups), non-decreasing; d_y, d_x, counts: int [E].
  Returns float32 [G]. Rows and columns are padded to a few bucket sizes; runs on the first
  CPU device.
  """
  if num_groups == 0:
    return np.zeros(0, np.float32)
  counts = counts.astype(np.int64)
  starts = np.searchsorted(group, np.arange(num_groups))

  def per_pair(v):  # exact integer sums per pair (float64 holds them exactly)
    return np.rint(np.bincount(group, weights=v, minlength=num_groups)).astype(np.int64)

  total, sy, sx = per_pair(counts), per_pair(counts * d_y), per_pair(counts * d_x)
  vy, vx = total[group] * d_y - sy[group], total[group] * d_x - sx[group]  # exact int64
  dist2 = (vy * vy + vx * vx) / (total[group].astype(np.float64) ** 2)
  order = np.lexsort((dist2, -counts, group))  # canonical row order
  group, counts, dist2 = group[order], counts[order], dist2[order]
  col = np.arange(group.size) - starts[group]
  width = _bucket(int(col.max()) + 1 if col.size else 1, 4, 4)
  rows = _bucket(num_groups, 64, 8)
  out = []
  for r0 in range(0, rows, 1 << 15):  # bounded kernel sizes (a bucket size) for huge calls
    nr = min(rows - r0, 1 << 15)
    sel = (group >= r0) & (group < r0 + nr)
    n_mat = np.zeros((nr, width), np.int32)
    d_mat = np.zeros((nr, width), np.float32)
    n_mat[group[sel] - r0, col[sel]] = counts[sel]
    d_mat[group[sel] - r0, col[sel]] = dist2[sel]
    with jax.default_device(jax.devices("cpu")[0]):
      s = pair_consistency(n_mat, d_mat, np.float32(sigma))
    out.append(np.asarray(s))
  return np.concatenate(out)[:num_groups]
