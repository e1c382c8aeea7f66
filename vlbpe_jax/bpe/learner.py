"""Incremental exact learner: pair counts are updated only around the tokens a merge touched.

State: `GridState` (tokens on the grids), exact int64 counts per (a, b, offset) and per (a, b)
in `SlotMap` tables, and a cache of S per (a, b), re-scored by the jitted kernel for the pairs
whose histogram changed. Per merge: pick the best pair (`_select`), find its occurrences from
the position list of a, subtract every pair that touches a vanishing token (old grid), commit,
add every pair that touches a new token (new grid). The result equals recounting from scratch.
"""

import time

import numpy as np
import tqdm

from vlbpe_jax.bpe import counting
from vlbpe_jax.bpe import grid_state
from vlbpe_jax.bpe import scoring
from vlbpe_jax.bpe import tables
from vlbpe_jax.bpe import vocab as vocab_lib


class _Counts:
  """Exact pair statistics and the S cache."""

  def __init__(self, keys, counts, h, w, sigma):
    self.h, self.w, self.d = h, w, h * (2 * w - 1)
    self.sigma = sigma
    self.triples = tables.SlotMap(keys)
    self.tcnt = counts.astype(np.int64)
    ab, first = np.unique(keys // self.d, return_index=True)
    self.pairs = tables.SlotMap(ab)
    self.acnt = np.add.reduceat(self.tcnt, first) if keys.size else np.zeros(0, np.int64)
    self.s = np.full(ab.size, np.nan, np.float32)  # S cache; NaN = not scored since a change
    self.floor = np.iinfo(np.int64).max             # every pair with count >= floor is in pool
    self.pool = np.zeros(0, np.int64)
    self.in_pool = np.zeros(ab.size, bool)

  def histograms(self, ab):
    """Flat (pair index, dy, dx, count) of the offsets of pairs `ab`, sorted by (pair, d)."""
    slots, which = self.triples.range_slots(ab * self.d, (ab + 1) * self.d)
    c = self.tcnt[slots]
    live = c > 0
    slots, which, c = slots[live], which[live], c[live]
    d = self.triples.keys[slots] % self.d
    order = np.lexsort((d, which))
    which, d, c = which[order], d[order], c[order]
    dy, dx = d // (2 * self.w - 1), d % (2 * self.w - 1) - (self.w - 1)
    return which, dy, dx, c

  def consistency(self, slots: np.ndarray) -> np.ndarray:
    """S of the pairs at `slots`, scoring (with the jitted kernel) those not cached."""
    stale = slots[np.isnan(self.s[slots])]
    if stale.size:
      which, dy, dx, c = self.histograms(self.pairs.keys[stale])
      self.s[stale] = scoring.score_histograms(which, dy, dx, c, stale.size, self.sigma)
    return self.s[slots]

  def dominant(self, ab: int):
    """(dy, dx) with the most occurrences of pair `ab` (ties: raster-first offset), its count."""
    _, dy, dx, c = self.histograms(np.array([ab], np.int64))
    i = int(np.argmax(c))  # histograms are sorted by d, so the first max is raster-first
    return (int(dy[i]), int(dx[i])), int(c[i])

  def update(self, keys: np.ndarray, signs: np.ndarray):
    """Adds +-1 per pair key; forgets the cached S of every (a, b) whose histogram changed."""
    uk, inv = np.unique(keys, return_inverse=True)
    dv = np.rint(np.bincount(inv, weights=signs, minlength=uk.size)).astype(np.int64)
    uk, dv = uk[dv != 0], dv[dv != 0]
    if not uk.size:
      return
    slots = self.triples.lookup_or_insert(uk)
    self.tcnt = tables.grow(self.tcnt, self.triples.size)
    np.add.at(self.tcnt, slots, dv)
    ab, first = np.unique(uk // self.d, return_index=True)
    slots = self.pairs.lookup_or_insert(ab)
    self.acnt = tables.grow(self.acnt, self.pairs.size)
    self.s = tables.grow(self.s, self.pairs.size)
    self.acnt[slots] += np.add.reduceat(dv, first)
    self.s[slots] = np.nan
    self.in_pool = tables.grow(self.in_pool, self.pairs.size)
    new = slots[(self.acnt[slots] >= self.floor) & ~self.in_pool[slots]]
    self.in_pool[new] = True
    self.pool = np.concatenate([self.pool, new])

  def _shrink_pool(self, floor: int):
    cnt = self.acnt[self.pool]
    self.in_pool[:self.pairs.size] = False
    self.floor, self.pool = floor, self.pool[cnt >= floor]
    self.in_pool[self.pool] = True

  def select(self, alpha: float, min_count: int):
    """Slot of the best pair and its (F, S, P), or None when no pair has >= min_count.

    P <= N / nmax + alpha, and a top-count pair has P = 1 + alpha * S, so only pairs with
    N >= need = nmax * (1 + alpha * S_top - alpha) can win. They are all in `pool` (every pair
    with N >= floor) while need >= floor; otherwise the pool is rebuilt by one full scan.
    """
    cnt = self.acnt[:self.pairs.size]
    for full_scan in (False, True):
      if full_scan:
        if not cnt.size or int(cnt.max()) < min_count:
          return None
        self.floor, self.pool = 0, np.arange(cnt.size, dtype=np.int64)
      self._shrink_pool(self.floor)
      pool = self.pool
      if not pool.size:
        continue
      pc = cnt[pool]
      nmax = int(pc.max())
      if nmax < min_count:
        continue
      need = float(nmax)
      if alpha:
        s_top = float(self.consistency(pool[pc == nmax]).max())
        need = nmax * (1.0 + alpha * s_top - alpha) * (1 - 1e-9)
      need = max(need, min_count)
      if need >= self.floor:
        break
    if full_scan:  # keep a pool a bit wider than needed, for the next merges
      self._shrink_pool(max(1, int(need * 0.75)))
    cand = pool[pc >= need]
    f = cnt[cand] / nmax
    p = f + alpha * self.consistency(cand).astype(np.float64) if alpha else f
    i = np.lexsort((self.pairs.keys[cand], -cnt[cand], -p))[0]
    s = float(self.consistency(cand[i:i + 1])[0])
    return int(cand[i]), float(f[i]), s, float(p[i])


def learn(grids: np.ndarray, base_vocab_size: int, num_merges: int, alpha: float,
          sigma: float, offsets, min_count: int, mesh=None, progress: bool = False):
  """Learns up to `num_merges` merges. Returns (Geometry, merge records, timing dict)."""
  t0 = time.perf_counter()
  n, h, w = grids.shape
  geo = vocab_lib.Geometry(base_vocab_size, offsets)
  vcap = base_vocab_size + num_merges
  keys, counts = counting.count_base_pairs(grids, geo.offsets, vcap, mesh)
  stats = _Counts(keys, counts, h, w, sigma)
  state = grid_state.GridState(grids, geo)
  vanish = np.zeros(n * h * w, bool)
  t_setup = time.perf_counter() - t0
  records = []
  for _ in tqdm.trange(num_merges, disable=not progress, desc="visual BPE merges"):
    best = stats.select(alpha, min_count)
    if best is None:
      break
    slot, f, s, pr = best
    ab = int(stats.pairs.keys[slot])
    a, b = divmod(ab, vcap)
    delta, n_delta = stats.dominant(ab)
    p, q = state.find_merge(a, b, delta)
    # Pairs that touch a vanishing token, each once (both ends vanishing: from the first end).
    xa, ya = state.neighbours(p, a)
    xb, yb = state.neighbours(q, b)
    x, y = np.concatenate([xa, xb]), np.concatenate([ya, yb])
    vanish[p] = vanish[q] = True
    keep = ~vanish[y] | (x < y)
    vanish[p] = vanish[q] = False
    removed = state.pair_codes(x[keep], y[keep], vcap)
    t = geo.add(a, b, delta)
    record = dict(id=t, a=a, b=b, offset=list(delta), count=int(stats.acnt[slot]),
                  offset_count=n_delta, merged=int(p.size), F=f, S=s, P=pr)
    state.commit_merge(b, p, q, t)
    x, y = state.neighbours(p, t)
    vanish[p] = True
    keep = ~vanish[y] | (x < y)
    vanish[p] = False
    added = state.pair_codes(x[keep], y[keep], vcap)
    stats.update(np.concatenate([removed, added]),
                 np.concatenate([-np.ones(removed.size), np.ones(added.size)]))
    records.append(record)
  total = time.perf_counter() - t0
  return geo, records, dict(setup_s=t_setup, merge_s=total - t_setup, total_s=total)
