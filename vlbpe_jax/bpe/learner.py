"""Incremental exact learner: pair counts are updated only around the tokens a merge touched.

State: `GridState` (tokens on the grids), exact int32 counts per (a, b, offset) (slots of a
`SlotMap`; a pair's triples take consecutive slots, so its histogram is one slice) and per
(a, b), and a cache of S per (a, b): a change to a pair's histogram clears its S,
and the kernel re-scores it only when the pair could win a merge. Per merge: pick the
best pair (`_Counts.select`), find its occurrences from the position list of a, subtract every
pair that touches a vanishing token (old grid), commit, add every pair that touches a new token
(new grid). The result equals recounting from scratch (tests/test_bpe_reference.py).
With `threads`, the grids are shards, each with its own `GridState` worked on by its own
thread, and their exact changes are summed before they are applied (as over hosts).
"""

_MARGIN = 1e-6  # relative slack on float bounds (S <= 1 up to float32 rounding): prune less
_LOWER = 4      # when the pool of pairs with N >= floor cannot decide: floor /= _LOWER
KEEP_CELLS = 1 << 20  # store only pairs with N >= cells / KEEP_CELLS (>= min_count) at first
MERGE_SLICE = 1 << 18  # anchors per slice of a large merge's count update (`_merge`), over
#                       all threads (each of T shards slices MERGE_SLICE / T)
THREAD_MIN_COUNT = 1 << 13  # merges of a pair seen fewer times run their shards one after
#                             another on the calling thread: the thread hand-offs would cost
#                             more than they save (BENCHMARKS.md, "At Being-VL scale")
TRIM_EVERY = 64  # threaded merges between two `_release_free_memory` calls
SHARD_CELLS = 1 << 22  # `default_threads`: at least this many cells per thread


class _Recount(Exception):
  """The pool must look below the storage threshold: recount every pair from the grids."""

  def __init__(self, floor: int):
    super().__init__(floor)
    self.floor = floor

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import os
import time

import numpy as np
import tqdm

from vlbpe_jax.bpe import counting
from vlbpe_jax.bpe import grid_state
from vlbpe_jax.bpe import scoring
from vlbpe_jax.bpe import tables
from vlbpe_jax.bpe import vocab as vocab_lib


def _release_free_memory():
  """Returns the C heap's free pages to the OS (glibc's `malloc_trim`; elsewhere a no-op).

  numpy arrays below glibc's mmap threshold (dynamic, up to 32 MB) come from malloc's heaps,
  one per thread that allocates, and freed ones stay resident: after a threaded first count
  the 10^5-grid run held 0.38 GB more than the one-thread run until trimmed (BENCHMARKS.md,
  "At Being-VL scale"). Called between the learner's phases and every `TRIM_EVERY` threaded
  merges: after every one, the pages returned were faulted in again by the next merge
  (3x the system time, and the faults of two threads contend: no speed-up left).
  """
  try:
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


def default_threads(num_cells: int) -> int:
  """Threads for learning from grids of `num_cells` cells: one per CPU this process may use,
  at most one per `SHARD_CELLS` cells (small corpora gain nothing from threads)."""
  cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
          os.cpu_count() or 1)  # no sched_getaffinity on macOS
  return max(1, min(cpus, num_cells // SHARD_CELLS))


class _Counts:
  """Exact pair statistics and the S cache, for the pairs that can still be merged.

  A pair's count only grows in the merge that creates its newer token (tokens are never made
  again and footprints never move), so a pair with N < min_count after that merge can never
  reach min_count: it is not stored (most pairs are rare noise pairs), and later decrements of
  such keys are ignored. `min_count` here is the storage threshold `keep` >= the learner's
  min_count: while the pool floor stays >= keep, pairs below it cannot win either; when the
  pool must look lower, `select` raises `_Recount` and the learner recounts from the grids.
  """

  def __init__(self, keys, counts, vcap, h, w, sigma, min_count, s_prior_count=0.0):
    """keys: int64 triple keys `(a * vcap + b) * D + d`, a pair's triples adjacent and in order
    of d, pairs in the order of their slots (first counts: sorted); counts: theirs (< 2**31).

    Per triple 22 bytes (index key 8, slot 4, count 4, pair 4, d 2), per pair 21 (key 4 or 8,
    first triple 4, length 4, count 4, S 4, pool flag 1): int32 wherever the range allows.
    """
    self.vcap, self.h, self.w, self.d = vcap, h, w, h * (2 * w - 1)
    self.sigma, self.min_count, self.s_prior_count = sigma, min_count, s_prior_count
    ab = keys // self.d  # a pair's triples are adjacent
    first = tables.run_starts(ab)
    acnt = (np.add.reduceat(counts, first, dtype=np.int64) if keys.size else
            np.zeros(0, np.int64))
    live = acnt >= min_count
    if not live.all():  # count_base_pairs_host(min_count=...) has dropped them already
      which = np.repeat(np.arange(first.size), np.diff(np.append(first, keys.size)))
      keys, counts = keys[live[which]], counts[live[which]]
      ab = keys // self.d
      first = tables.run_starts(ab)
      acnt = acnt[live]
    del live
    self.triples = tables.SlotMap(self._index_key(keys))  # slot = rank: a pair's triples
    #                                                       are contiguous, in order of d
    small = self.d < np.iinfo(np.int16).max
    self.td = (keys % self.d).astype(np.int16 if small else np.int32)  # triple slot -> d
    self.tcnt = counts.astype(np.int32)
    self.npairs = first.size
    self.key_dtype = np.int32 if vcap * vcap < np.iinfo(np.int32).max else np.int64
    self.pair_keys = ab[first].astype(self.key_dtype)
    del ab, keys, counts
    self.tstart = first.astype(np.int32)                    # pair slot -> first triple
    self.tlen = np.diff(np.append(first, self.tcnt.size)).astype(np.int32)  # its triples
    self.tpair = np.repeat(np.arange(self.npairs, dtype=np.int32), self.tlen)  # triple -> pair
    self.acnt = acnt.astype(np.int32)
    self.s = np.full(self.acnt.size, np.nan, np.float32)  # S cache; NaN = not scored yet
    self.floor = np.iinfo(np.int64).max             # every pair with count >= floor is in pool
    self.pool = np.zeros(0, np.int64)
    self.in_pool = np.zeros(self.acnt.size, bool)

  def _index_key(self, keys: np.ndarray) -> np.ndarray:
    """Triple key `(a * vcap + b) * D + d` -> its key in `triples`, ordered by (newer token,
    older token, a > b, d): the triples made with a new token sort after all stored ones, so
    the index only ever appends. Its remainder mod D is still d."""
    ab, d = keys // self.d, keys % self.d
    a, b = ab // self.vcap, ab % self.vcap
    newer, older = np.maximum(a, b), np.minimum(a, b)
    return ((newer * self.vcap + older) * 2 + (a > b)) * self.d + d

  def adopt_scores(self, old: "_Counts"):
    """Takes the cached S of the pairs that `old` has scored (their histograms are the same)."""
    ok = ~np.isnan(old.s[:old.npairs])
    keys, s = old.pair_keys[:old.npairs][ok], old.s[:old.npairs][ok]
    mine = self.pair_keys[:self.npairs]
    if not keys.size or not mine.size:
      return
    order = np.argsort(mine)
    i, hit = tables.find_sorted(mine[order], keys)
    self.s[order[i[hit]]] = s[hit]

  def histograms(self, pairs: np.ndarray):
    """Flat (index into `pairs`, dy, dx, count) of the offsets of pair slots `pairs`, sorted
    by (index, d)."""
    slots, which = tables.ranges_to_indices(self.tstart[pairs],
                                            self.tstart[pairs] + self.tlen[pairs])
    c = self.tcnt[slots]
    live = c > 0
    slots, which, c = slots[live], which[live], c[live]
    d = self.td[slots].astype(np.int64)  # a pair's triples sit in slots in order of d
    dy, dx = d // (2 * self.w - 1), d % (2 * self.w - 1) - (self.w - 1)
    return which, dy, dx, c

  def consistency(self, slots: np.ndarray) -> np.ndarray:
    """S of the pairs at `slots`, scoring (with the kernel) those not cached."""
    stale = slots[np.isnan(self.s[slots])]
    if stale.size:
      which, dy, dx, c = self.histograms(stale)
      self.s[stale] = scoring.score_histograms(which, dy, dx, c, stale.size, self.sigma,
                                               self.s_prior_count)
    return self.s[slots]

  def dominant(self, slot: int):
    """(dy, dx) with the most occurrences of pair `slot` (ties: raster-first offset), count."""
    _, dy, dx, c = self.histograms(np.array([slot], np.int32))
    i = int(np.argmax(c))  # histograms are sorted by d, so the first max is raster-first
    return (int(dy[i]), int(dx[i])), int(c[i])

  def _add_pairs(self, keys: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """Stores the new triples `keys` (sorted, absent) of pairs with N >= min_count, all of
    whose triples are in `keys`; returns the triple slots (-1: not stored)."""
    ab = keys // self.d
    first = tables.run_starts(ab)
    runs = np.diff(np.append(first, ab.size))
    keep = np.repeat(np.add.reduceat(dv, first) >= self.min_count, runs)
    out = np.full(keys.size, -1, np.int64)
    if not keep.any():
      return out
    slots = self.triples.insert(self._index_key(keys[keep]))  # consecutive, in key order
    out[keep] = slots
    self.td = tables.grow(self.td, self.triples.size)
    self.td[slots] = keys[keep] % self.d
    first, runs = first[keep[first]], runs[keep[first]]
    pslots = np.arange(self.npairs, self.npairs + first.size, dtype=np.int32)
    self.npairs += first.size
    self.pair_keys = tables.grow(self.pair_keys, self.npairs)
    self.pair_keys[pslots] = ab[first]
    self.tstart = tables.grow(self.tstart, self.npairs)
    self.tlen = tables.grow(self.tlen, self.npairs)
    self.tstart[pslots] = out[first]
    self.tlen[pslots] = runs
    self.tpair = tables.grow(self.tpair, self.triples.size)
    self.tpair[slots] = np.repeat(pslots, runs)
    return out

  def apply(self, uk: np.ndarray, dv: np.ndarray):
    """Adds `dv` (nonzero) to the counts of the sorted unique triple keys `uk` (`net_changes`,
    summed over hosts when there are several); forgets the cached S of every (a, b) whose
    histogram changed."""
    if not uk.size:
      return
    # Removed keys (dv < 0) hold a vanishing token: absent if their pair is not stored
    # (N < min_count). Added keys (dv > 0) hold the token just made, so they are all new and
    # all of their pairs' triples are here: stored if N >= min_count.
    new = dv > 0
    slots = np.full(uk.size, -1, np.int64)
    slots[~new] = self.triples.lookup(self._index_key(uk[~new]))
    if new.any():
      slots[new] = self._add_pairs(uk[new], dv[new])
    found = slots >= 0
    uk, dv, slots = uk[found], dv[found], slots[found]
    if not uk.size:
      return
    abk = uk // self.d  # sorted, like uk
    self.tcnt = tables.grow(self.tcnt, self.triples.size)
    self.tcnt[slots] += dv  # uk is unique
    first = tables.run_starts(abk)
    slots = self.tpair[slots[first]]
    self.acnt = tables.grow(self.acnt, self.npairs)
    self.s = tables.grow(self.s, self.npairs)
    self.acnt[slots] += np.add.reduceat(dv, first)
    self.s[slots] = np.nan
    self.in_pool = tables.grow(self.in_pool, self.npairs)
    new = slots[(self.acnt[slots] >= self.floor) & ~self.in_pool[slots]]
    self.in_pool[new] = True
    self.pool = np.concatenate([self.pool, new])

  def _set_pool(self, floor: int, cnt: np.ndarray, full_scan: bool):
    """Keeps the invariant: every pair with N >= floor is in the pool."""
    if full_scan:
      self.pool = np.flatnonzero(cnt >= floor)
      self.in_pool[:] = False
      self.in_pool[self.pool] = True
    else:
      keep = cnt[self.pool] >= floor
      self.in_pool[self.pool[~keep]] = False
      self.pool = self.pool[keep]
    self.floor = floor

  def _best_in_pool(self, cnt, alpha, min_count):
    """The best pool pair, if no pair outside the pool (N < floor) can beat it; else None.

    P = N / nmax + alpha * S <= N / nmax + alpha (S here is S_k <= 1 for any k), so after
    scoring the pool in decreasing-N chunks, a pair with N / nmax + alpha < best P cannot win
    (`_MARGIN` keeps the cut conservative); only the scored pairs go to the exact tie-break.
    """
    pc = cnt[self.pool]
    nmax = int(pc.max())
    order = np.argsort(-pc, kind="stable")
    cand, f = self.pool[order], pc[order] / nmax
    if alpha:
      best, done, chunk = -np.inf, 0, 64
      while done < cand.size and f[done] + alpha >= best * (1 - _MARGIN):
        s = self.consistency(cand[done:done + chunk]).astype(np.float64)
        best = max(best, float((f[done:done + chunk] + alpha * s).max()))
        done, chunk = done + s.size, chunk * 2
      cand, f = cand[:done], f[:done]
    else:
      best = 1.0
      cand, f = cand[f == 1.0], f[f == 1.0]
    if self.floor > min_count and (self.floor - 1) / nmax + alpha >= best * (1 - _MARGIN):
      return None  # an eligible pair below the floor (not in the pool) might still win
    p = f + alpha * self.consistency(cand).astype(np.float64) if alpha else f
    i = np.lexsort((self.pair_keys[cand], -cnt[cand], -p))[0]
    s = float(self.consistency(cand[i:i + 1])[0])
    return (int(cand[i]), float(f[i]), s, float(p[i])), nmax, best

  def select(self, alpha: float, min_count: int):
    """Slot of the best pair and its (F, S, P), or None when no pair has N >= min_count.

    All pairs with N >= floor are in `pool`, so a merge looks at a few hundred pairs; when the
    pool cannot decide, the floor is lowered (a scan of all counts) until it can.
    """
    cnt = self.acnt[:self.npairs]
    self._set_pool(max(self.floor, min_count), cnt, False)
    while True:
      if self.pool.size:
        found = self._best_in_pool(cnt, alpha, min_count)
        if found is not None:
          result, nmax, best = found
          # Raise the floor to ~85% of the lowest N that could still have won.
          floor = int(nmax * (best - alpha) * 0.85)
          if floor > self.floor:
            self._set_pool(floor, cnt, False)
          return result
      if self.floor <= min_count:
        return None
      floor = max(min_count, self.floor // _LOWER)
      if floor < self.min_count:  # unstored pairs (N < keep) might win: recount them
        raise _Recount(floor)
      self._set_pool(floor, cnt, True)


def net_changes(removed: np.ndarray, added: np.ndarray):
  """Sorted unique triple keys and their net count changes (-1 per removed, +1 per added
  occurrence; keys whose changes cancel are dropped)."""
  ks = np.sort(np.concatenate([removed * 2, added * 2 + 1]))  # key * 2 + sign bit
  if not ks.size:
    return ks, ks
  starts = tables.run_starts(ks)
  runs = np.diff(np.append(starts, ks.size))
  k2 = ks[starts]
  uk, dv = k2 >> 1, np.where(k2 & 1, runs, -runs)
  if uk.size > 1:  # a key both removed and added: adjacent runs, sum them
    first = tables.run_starts(uk)
    uk, dv = uk[first], np.add.reduceat(dv, first)
  return uk[dv != 0], dv[dv != 0]


def _merge(state: grid_state.GridState, vanish: np.ndarray, a: int, b: int, t: int,
           p: np.ndarray, q: np.ndarray, vcap: int, slice_size: int = MERGE_SLICE):
  """Merges the (a, b) occurrences at anchors (p, q) into t; returns `net_changes` of the
  pair counts. Large merges (the first ones) go `slice_size` anchors at a time, so that
  their per-neighbour temporaries stay small; the sums are the same integers.
  `vanish` is all-False cell flags, all-False again on return."""

  def pairs_at(xs, ys):
    """Codes of the (anchor x, neighbour y) pairs, each pair once: one whose ends are both
    marked in `vanish` is taken from its raster-first end."""
    x, y = np.concatenate(xs), np.concatenate(ys)
    keep = ~np.take(vanish, y) | (x < y)
    return state.pair_codes(x[keep], y[keep], vcap)

  slices = [slice(i, i + slice_size) for i in range(0, max(p.size, 1), slice_size)]
  vanish[p] = vanish[q] = True
  removed = []
  for sl in slices:
    (xa, ya), (xb, yb) = state.neighbours(p[sl], a), state.neighbours(q[sl], b)
    removed.append(pairs_at([xa, xb], [ya, yb]))
  vanish[p] = vanish[q] = False
  state.commit_merge(b, p, q, t)
  vanish[p] = True
  added = []
  for sl in slices:
    x, y = state.neighbours(p[sl], t)
    added.append(pairs_at([x], [y]))
  vanish[p] = False
  if len(slices) == 1:
    return net_changes(removed[0], added[0])
  runs = [net_changes(r, np.zeros(0, np.int64)) for r in removed]
  runs += [net_changes(np.zeros(0, np.int64), x) for x in added]
  uk, dv = tables.sum_by_key(np.concatenate([k for k, _ in runs]),
                             np.concatenate([v for _, v in runs]))
  return uk[dv != 0], dv[dv != 0]


def _recount(states, vcap: int, exchange=None, pool=None):
  """Keys and counts of every pair of neighbouring tokens on the grids now (of every shard in
  `states`, and of all hosts' grids with an `exchange`), in the order in which the learner
  stores pairs: base pairs first, then by newer token (the merge that made it), then by key.
  So the pool and the S batches stay those of a learner that never pruned.
  """
  keys, counts = _sum_shards(tables.pool_map(pool, _shard_pairs, states,
                                             [vcap] * len(states)))
  counts = counts.astype(np.int32)
  if exchange is not None:  # the counts of every host's grids
    keys, counts, _ = exchange.sum_runs(keys, counts)
    counts = counts.astype(np.int32)
  state = states[0]
  ab = keys // (state.h * (2 * state.w - 1))
  newer = np.maximum(ab // vcap, ab % vcap)
  order = np.argsort(np.where(newer >= state.geo.base, newer, -1), kind="stable")
  return keys[order], counts[order]


def _sum_shards(runs):
  """Sorted unique keys and summed values of the shards' `(keys, values, ...)` runs."""
  if len(runs) == 1:
    return runs[0][0], runs[0][1]
  # Each shard's keys are sorted: the stable sort in `sum_by_key` merges the runs.
  return tables.sum_by_key(np.concatenate([r[0] for r in runs]),
                           np.concatenate([r[1] for r in runs]))


def _shard_pairs(state: grid_state.GridState, vcap: int):
  """Sorted unique keys of the neighbouring token pairs on one shard's grids, and counts."""
  anchors = np.flatnonzero(state.tok >= 0).astype(state.idx)
  toks = state.tok[anchors]
  order = np.argsort(toks, kind="stable")
  anchors, toks = anchors[order], toks[order]
  del order
  starts = np.append(tables.run_starts(toks), toks.size)
  codes = []
  for i, j in zip(starts[:-1], starts[1:]):
    x, y = state.neighbours(anchors[i:j], int(toks[i]))
    keep = x < y  # each pair is seen from both of its tokens
    codes.append(state.pair_codes(x[keep], y[keep], vcap))
  del anchors, toks
  keys = np.concatenate(codes) if codes else np.zeros(0, np.int64)
  del codes
  keys.sort()
  first = tables.run_starts(keys)
  return keys[first], np.diff(np.append(first, keys.size)).astype(np.int32)


def _shard_merge(state, a: int, b: int, delta, t: int, vcap: int, slice_size: int):
  """One shard's part of a merge: (net key changes, their counts, occurrences merged)."""
  p, q = state.find_merge(a, b, delta)
  uk, dv = _merge(state, state.scratch, a, b, t, p, q, vcap, slice_size)
  return uk, dv, p.size


def _first_counts(grids, offsets, vcap, keep, exchange, pool=None, chunk_cells=0):
  """Keys and counts of the base pairs (a, b) seen >= `keep` times over every host's grids
  (sorted by key), in two passes: a pair's global count is >= keep only if some host counts
  >= keep / P of it, so the hosts first pool their candidates, then count exactly just those.
  pool, chunk_cells: of `counting.count_base_pairs_host`.
  """
  p = exchange.num_processes
  if -(-keep // p) > 1:
    k, _ = counting.count_base_pairs_host(grids, offsets, vcap, -(-keep // p), chunk_cells,
                                          pool=pool)
    cand = np.unique(k // (grids.shape[1] * (2 * grids.shape[2] - 1)))
    del k
    cand, _, _ = exchange.sum_runs(cand, np.ones(cand.size, np.int32))
    keys, counts = counting.count_base_pairs_host(grids, offsets, vcap, 1, chunk_cells,
                                                  only=cand, pool=pool)
  else:
    keys, counts = counting.count_base_pairs_host(grids, offsets, vcap, 1, chunk_cells,
                                                  pool=pool)
  keys, counts, _ = exchange.sum_runs(keys, counts)
  return keys, counts.astype(np.int32)


def learn(grids: np.ndarray, base_vocab_size: int, num_merges: int, alpha: float,
          sigma: float, offsets, min_count: int, mesh=None, progress: bool = False,
          s_prior_count: float = 0.0, exchange=None, threads: int = 1):
  """Learns up to `num_merges` merges. Returns (Geometry, merge records, timing dict).

  s_prior_count: pseudo-count k of the small-sample correction of S (`scoring`; 0: none).
  exchange: an `exchange.Exchange` over several hosts, `grids` being this host's shard: every
  count is summed over the hosts (`exchange`), and every host returns the same merges, those of
  one host learning from all the grids. `mesh` is then unused (counts on the host).
  threads: the grids are split into this many shards (contiguous rows, at most one per grid),
  each with its own grid state; per merge each shard's grid work (`find_merge`, the count
  changes around the merged tokens) runs on its own thread (numpy releases the GIL in its
  array loops), and the shards' exact integer changes are summed, as over hosts. The first
  counts are threaded too. The merges do not depend on `threads`.

  timing: wall seconds (setup_s: first counts + tables, merge_s: the merge loop, total_s) and
  CPU seconds of this process (cpu_s, merge_cpu_s; all threads); with an exchange, also
  exchange_calls (collectives issued) and exchange_s (wall seconds in them, waits included).
  """
  t0, c0 = time.perf_counter(), time.process_time()
  n, h, w = grids.shape
  geo = vocab_lib.Geometry(base_vocab_size, offsets)
  vcap = base_vocab_size + num_merges
  if exchange is not None:
    n = exchange.sum_ints([n])[0]
  if n * h * w * len(geo.offsets) >= np.iinfo(np.int32).max:
    raise ValueError(f"{n} grids of {h}x{w} with {len(geo.offsets)} offsets: pair counts could "
                     "overflow int32; expected fewer than 2**31 pair occurrences")
  keep = max(min_count, n * h * w // KEEP_CELLS)  # storage threshold (see `_Counts`)
  threads = min(int(threads), grids.shape[0])  # >= 1: checked by `VisualBPE.learn`
  executor = (concurrent.futures.ThreadPoolExecutor(threads) if threads > 1 else
              contextlib.nullcontext())  # pool None: the shards' work on this thread
  with executor as pool:
    chunk = counting.CHUNK_CELLS // threads  # T chunks' temporaries at once: 1 / T each
    if exchange is not None:
      keys, counts = _first_counts(grids, geo.offsets, vcap, keep, exchange, pool, chunk)
    elif mesh is None:  # host numpy; a mesh shards the jitted count (same integers either way)
      keys, counts = counting.count_base_pairs_host(grids, geo.offsets, vcap, keep, chunk,
                                                    pool=pool)
    else:
      from vlbpe_jax.bpe import sharded_counting  # pylint: disable=g-import-not-at-top
      keys, counts = sharded_counting.count_base_pairs(grids, geo.offsets, vcap, mesh)
    stats = _Counts(keys, counts, vcap, h, w, sigma, keep, s_prior_count)
    del keys, counts
    _release_free_memory()
    bounds = [grids.shape[0] * i // threads for i in range(threads + 1)]
    states = tables.pool_map(
        pool, lambda lo, hi: grid_state.GridState(grids[lo:hi], geo, capacity=vcap),
        bounds[:-1], bounds[1:])
    _release_free_memory()
    slice_size = max(1, MERGE_SLICE // threads)  # T shards' temporaries at once: 1 / T each
    t_setup, c_setup = time.perf_counter() - t0, time.process_time() - c0
    records = []
    recounts = threaded_merges = 0
    for _ in tqdm.trange(num_merges, disable=not progress, desc="visual BPE merges"):
      while True:
        try:
          best = stats.select(alpha, min_count)
          break
        except _Recount as e:  # rare: the winner may be a pair below the storage threshold
          keep, recounts = e.floor, recounts + 1
          keys, counts = _recount(states, vcap, exchange, pool)
          old, stats = stats, _Counts(keys, counts, vcap, h, w, sigma, keep, s_prior_count)
          stats.adopt_scores(old)
          del keys, counts, old
          stats._set_pool(  # pylint: disable=protected-access
              keep, stats.acnt[:stats.npairs], True)
      if best is None:
        break
      slot, f, s, pr = best
      a, b = divmod(int(stats.pair_keys[slot]), vcap)
      delta, n_delta = stats.dominant(slot)
      t = geo.add(a, b, delta)
      threaded = pool is not None and stats.acnt[slot] >= THREAD_MIN_COUNT
      parts = tables.pool_map(pool if threaded else None,
                              lambda st: _shard_merge(st, a, b, delta, t, vcap, slice_size),
                              states)
      threaded_merges += threaded
      if threaded and threaded_merges % TRIM_EVERY == 0:
        _release_free_memory()  # the threads' heaps
      uk, dv = _sum_shards(parts)
      uk, dv, merged = uk[dv != 0], dv[dv != 0], sum(m for _, _, m in parts)
      del parts
      record = dict(id=t, a=a, b=b, offset=list(delta), count=int(stats.acnt[slot]),
                    offset_count=n_delta, merged=int(merged), F=f, S=s, P=pr)
      if exchange is not None:  # every host's changes, summed: the same on every host
        uk, dv, (record["merged"],) = exchange.sum_runs(uk, dv, [merged])
        uk, dv = uk[dv != 0], dv[dv != 0]
      stats.apply(uk, dv)
      records.append(record)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    timing = dict(setup_s=t_setup, merge_s=total - t_setup, total_s=total, cpu_s=cpu,
                  merge_cpu_s=cpu - c_setup, recounts=recounts)
    if exchange is not None:
      timing.update(exchange_calls=exchange.calls, exchange_s=exchange.seconds)
    return geo, records, timing
