"""The pair-scoring kernel: spatial consistency S of many candidate pairs at once.

For one pair (a, b) with offset histogram `n_delta` (how often b sits at anchor offset delta from
a), N = sum n_delta, u_bar = sum n_delta * delta / N and

  S(a, b) = (1 / N) * sum_delta n_delta * exp(-||delta - u_bar||^2 / (2 sigma^2)),

which equals the seed's (1/N_ab) sum_i exp(-||u_i - u_bar||^2 / 2 sigma^2) over occurrences i,
grouped by their (discrete) offsets. The host computes the sufficient statistics exactly:
||delta - u_bar||^2 = q / N^2 with the integer q = ||N delta - sum n delta'||^2; the numpy
kernel scores a padded batch `[K, D]` of (n, q / N^2) rows.

Small-sample correction: a pair seen twice at one offset has S = 1, like one seen 10,000 times.
With a pseudo-count k >= 0 (`s_prior_count`) S is shrunk towards the prior S0 = 0 (no evidence
of consistency) as if k extra occurrences scored S0:

  S_k = (N * S + k * S0) / (N + k) = S * N / (N + k).

S0 = 0 is the lower end of S's range, so S_k <= S <= 1 (the learner's bound P <= F + alpha still
holds) and S_k grows with N for a fixed histogram shape; k = 0 gives S exactly (N / N = 1 in
float32). The factor N / (N + k) is computed in float32 inside the kernel from the integer N.

Bit-exactness: the kernel's inputs are exact functions of the integer histogram, each row is put
in a canonical order (by n, then distance), and every sum over D is an adjacent-pair tree of
single float32 additions (`x[0::2] + x[1::2]`), so zero padding never changes a result, whatever
D is. Two histograms of the same shape (equal up to a shift, mirror or transpose of the offsets)
therefore get bit-identical S and tie exactly (S_k too: N / (N + k) depends only on N, an exact
integer sum). The kernel is numpy, not a jitted XLA computation: XLA CPU's exp and its fusing of
multiply-adds change with the compiler flags (`--xla_backend_optimization_level`, as the tests
set) and with the host's FMA support, which changed S in the last bit and reordered merges. Here
the Gaussian is computed in float64 and rounded once to float32 and every other step is a single
IEEE float32 operation, so a histogram gets the same S on any machine, mesh or XLA setting (up to
a float64 exp result straddling a float32 rounding boundary, ~2**-29 per value).
"""

import numpy as np


def _tree_sum(x):
  """Sum over the last axis (a power of two) by adjacent pairs: [K, D] -> [K]."""
  while x.shape[-1] > 1:
    x = x[..., 0::2] + x[..., 1::2]
  return x[..., 0]


def pair_consistency(counts, dist2, sigma, prior_count):
  """S_k per pair. counts: [K, D] int (0 = padding); dist2: [K, D] float64, ||delta -
  u_bar||^2; sigma, prior_count (k): floats.

  D is a power of two. Returns S_k: [K] float32 (0 for all-padding rows).
  """
  counts, dist2 = np.asarray(counts), np.asarray(dist2, np.float64)
  if counts.ndim != 2 or counts.shape != dist2.shape:
    raise ValueError(f"pair_consistency: counts {counts.shape} and dist2 {dist2.shape}: "
                     "expected two [K, D] arrays of one shape")
  if counts.shape[-1] & (counts.shape[-1] - 1):
    raise ValueError(f"pair_consistency: D={counts.shape[-1]} columns, expected a power of two")
  n = counts.astype(np.float32)                                             # [K, D]
  kern = np.exp(-dist2 / (2.0 * float(sigma) ** 2)).astype(np.float32)      # [K, D]
  tot = _tree_sum(n)                                                         # [K]
  s = _tree_sum(n * kern) / np.maximum(tot, np.float32(1.0))                 # [K]
  n_int = counts.sum(axis=-1).astype(np.float32)        # [K] exact integer N, any order
  shrink = n_int / np.maximum(n_int + np.float32(prior_count), np.float32(1.0))  # N / (N + k)
  return np.where(tot > 0, s * shrink, np.float32(0.0)).astype(np.float32)


def _bucket(n: int, lo: int, step: int) -> int:
  """Smallest lo * step**k >= n: few distinct kernel shapes, hence few compiles."""
  size = lo
  while size < n:
    size *= step
  return size


def score_histograms(group, d_y, d_x, counts, num_groups: int, sigma: float,
                     prior_count: float = 0.0) -> np.ndarray:
  """S_k for `num_groups` pairs from flat histogram entries sorted by pair.

  group: int64 [E] pair index in [0, num_groups), non-decreasing; d_y, d_x, counts: int [E];
  prior_count: the pseudo-count k >= 0 (0: plain S). Returns float32 [G]. Rows and columns are
  padded to a power of two (the tree sums), in blocks of 2**15 pairs.
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
  out = []
  for r0 in range(0, num_groups, 1 << 15):  # bounded [rows, width] blocks for huge calls
    nr = min(num_groups - r0, 1 << 15)
    sel = (group >= r0) & (group < r0 + nr)
    n_mat = np.zeros((nr, width), np.int32)
    d_mat = np.zeros((nr, width), np.float64)
    n_mat[group[sel] - r0, col[sel]] = counts[sel]
    d_mat[group[sel] - r0, col[sel]] = dist2[sel]
    out.append(pair_consistency(n_mat, d_mat, sigma, prior_count))
  return np.concatenate(out)
