"""First-round pair counts of base-code grids on the host (numpy only: no jax import).

Before any merge every token is one cell, so two tokens are neighbours exactly when their cells
differ by a window offset. Each chunk of grids becomes sorted pair codes with their run lengths,
and the chunks' runs are merged by ranges of pair ids. `sharded_counting.count_base_pairs` gives
the same integers from a jitted count sharded over a mesh.
"""

import numpy as np

from vlbpe_jax.bpe import tables

CHUNK_CELLS = 1 << 24  # cells coded per chunk, and codes merged per range


def _chunk_runs(grids, offsets, vcap, dtype):
  """Sorted unique pair codes `(a * vcap + b) * K + o` of some grids, and their counts."""
  _, h, w = grids.shape
  k = len(offsets)
  codes = np.empty(sum((h - dy) * (w - abs(dx)) for dy, dx in offsets) * grids.shape[0], dtype)
  at = 0
  for o, (dy, dx) in enumerate(offsets):
    x0, x1 = max(0, -dx), w - max(0, dx)
    part = grids[:, :h - dy, x0:x1].astype(dtype)
    part *= vcap
    part += grids[:, dy:, x0 + dx:x1 + dx]
    part *= k
    part += o
    codes[at:at + part.size] = part.ravel()
    at += part.size
    del part
  codes.sort()
  new = np.empty(codes.size, bool)
  new[:1] = True
  np.not_equal(codes[1:], codes[:-1], out=new[1:])
  first = np.flatnonzero(new)
  del new
  counts = np.diff(np.append(first, codes.size)).astype(np.int32)
  return codes[first], counts


def count_base_pairs_host(grids: np.ndarray, offsets, vcap: int, min_count: int = 1,
                          chunk_cells: int = 0, only: np.ndarray | None = None, pool=None):
  """`count_base_pairs` with numpy on the host (faster than XLA's CPU sort on one CPU).

  Each pair is coded `(a * vcap + b) * K + o` with o the rank of its offset in raster order
  (so code order is key order), in int32 when that fits (a sort twice as fast as int64).
  Memory stays near the size of the result: grids are coded and run-length counted in chunks
  of about `chunk_cells` cells (0: `CHUNK_CELLS`), then the chunks' runs are merged one range
  of codes at a time, dropping the pairs (a, b) whose count over all offsets is below
  `min_count` (those cannot be merged, see `learner`). Counts are int32 (ValueError if a count
  could overflow). `only`: sorted pair ids `a * vcap + b`; counts just these pairs (the second
  pass of a count over several hosts, `learner.learn`). `pool`: a thread pool
  (`concurrent.futures`) that codes the chunks and merges the ranges in parallel (numpy
  releases the GIL in its sorts); the result is the same.
  """
  n, h, w = grids.shape
  chunk_cells = chunk_cells or CHUNK_CELLS
  offsets = sorted(offsets)  # raster order of (dy, dx) = increasing d
  k = len(offsets)
  if n * h * w * k >= np.iinfo(np.int32).max:
    raise ValueError(f"{n} grids of {h}x{w} with {k} offsets: pair counts could overflow int32; "
                     "expected fewer than 2**31 pair occurrences (count in parts)")
  dtype = np.int32 if vcap * vcap * k < np.iinfo(np.int32).max else np.int64
  step = max(1, chunk_cells // (h * w))
  only = None if only is None else np.asarray(only, np.int64)

  def chunk_runs(i):
    c, m = _chunk_runs(grids[i:i + step], offsets, vcap, dtype)
    if only is not None:
      keep = tables.find_sorted(only, c // k)[1]
      c, m = c[keep], m[keep]
    return c, m

  runs = tables.pool_map(pool, chunk_runs, range(0, n, step))
  total = sum(r[0].size for r in runs)
  # Merge by ranges of (a, b) (bounds at multiples of K, so a pair never straddles two).
  hi_code = max((int(r[0][-1]) for r in runs if r[0].size), default=0) + 1
  nparts = max(1, -(-total // max(chunk_cells, 1)))
  bounds = [((hi_code * i // nparts) // k) * k for i in range(nparts)] + [hi_code]
  d = np.array([dy * (2 * w - 1) + dx + w - 1 for dy, dx in offsets], np.int64)

  def merge_range(lo, hi):
    parts = [(c[np.searchsorted(c, lo):np.searchsorted(c, hi)],
              m[np.searchsorted(c, lo):np.searchsorted(c, hi)]) for c, m in runs]
    c = np.concatenate([x for x, _ in parts])
    m = np.concatenate([y for _, y in parts])
    del parts
    if not c.size:
      return None
    order = np.argsort(c, kind="stable")
    c, m = c[order], m[order]
    del order
    first = np.flatnonzero(np.concatenate([[True], c[1:] != c[:-1]]))
    c, m = c[first], np.add.reduceat(m, first, dtype=np.int64).astype(np.int32)
    if min_count > 1:  # drop pairs (a, b) seen fewer than min_count times over all offsets
      ab = c // k
      start = np.flatnonzero(np.concatenate([[True], ab[1:] != ab[:-1]]))
      live = np.add.reduceat(m, start, dtype=np.int64) >= min_count
      keep = np.repeat(live, np.diff(np.append(start, ab.size)))
      c, m = c[keep], m[keep]
    return (c // k).astype(np.int64) * (h * (2 * w - 1)) + d[c % k], m

  merged = [r for r in tables.pool_map(pool, merge_range, bounds[:-1], bounds[1:])
            if r is not None]
  if not merged:
    return np.zeros(0, np.int64), np.zeros(0, np.int32)
  return np.concatenate([x for x, _ in merged]), np.concatenate([y for _, y in merged])
