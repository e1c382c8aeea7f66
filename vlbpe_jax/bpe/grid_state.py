"""A batch of grids under merges: which token sits at each anchor, which anchor owns each cell.

Cells are numbered globally `g = n * H * W + y * W + x` (image n), so the raster order of
anchors inside one image is the order of `g`. `tok[g]` is the token anchored at g (-1 if g is
covered by another token); `owners(g)` is the anchor of the token covering g, stored as its
index inside g's grid (`own`, int16 while H * W < 2**15). `find_merge` and
`commit_merge` are the one merge rule that learning and encoding share (see `vlbpe_jax.bpe`).

Memory per cell: 2 bytes of token (int16 while every token id < 2**15, else 4), 2 of owner
(its index in the grid; 4 for grids of 2**15 cells or more), 4 of base-code index (int32 cell
ids below 2**31 cells), 1 of scratch flags.
"""

_INDEX_CHUNK = 1 << 20  # cells per argsort while building the base-code index (cache-sized)

import numpy as np

from vlbpe_jax.bpe import vocab as vocab_lib


def _mod(x: np.ndarray, n: int) -> np.ndarray:
  """`x % n` for a positive int n: numpy's integer `%` does not use the fast divide by a
  scalar that `//` does (2.2x slower on int32 cell ids, and cell ids are the hot path)."""
  return x - x // n * n


def _base_index(tok: np.ndarray, base: int, idx) -> tuple[np.ndarray, np.ndarray]:
  """Cells grouped by base code, ascending within a code (a stable argsort of `tok`), built
  a chunk at a time so that no int64 array of all cells is made; and each code's start."""
  start = np.concatenate([[0], np.cumsum(np.bincount(tok, minlength=base))])
  order = np.empty(tok.size, idx)
  fill = start[:-1].copy()  # next free place of each code
  for lo in range(0, tok.size, _INDEX_CHUNK):
    part = tok[lo:lo + _INDEX_CHUNK]
    # Base codes in [0, V), V <= 65536: a 16-bit stable argsort is a radix sort.
    o = np.argsort(part.astype(np.uint16) if base <= 1 << 16 else part, kind="stable")
    code = part[o]
    c = np.bincount(part, minlength=base)
    order[fill[code] + np.arange(o.size) - (np.cumsum(c) - c)[code]] = o + lo
    fill += c
  return order, start


class GridState:

  def __init__(self, grids: np.ndarray, geometry: vocab_lib.Geometry, capacity: int = 0):
    """grids: int [N, H, W] base codes; capacity: every token id will stay below it (0: 2**31).
    """
    self.n, self.h, self.w = grids.shape
    self.geo = geometry
    narrow = 0 < capacity <= np.iinfo(np.int16).max
    self.tok = np.array(grids, np.int16 if narrow else np.int32).reshape(-1)
    # Cell ids in int32 when every id +- one grid fits (halves the memory traffic).
    small = (self.n + 2) * self.h * self.w < np.iinfo(np.int32).max
    self.idx = np.int32 if small else np.int64
    self.hw = self.h * self.w
    local = np.arange(self.hw)
    self.own = np.tile(local.astype(np.int16 if self.hw <= np.iinfo(np.int16).max else np.int32),
                       self.n)  # owner's index inside its grid
    self.scratch = np.zeros(self.tok.size, bool)  # cell flags, all-False between uses
    self._yx = local // self.w, local % self.w  # row, col of each cell of one grid
    self._base_order, self._base_start = _base_index(self.tok, geometry.base, self.idx)
    # Candidate anchors (may be stale; checked on use): of a base code, the first `_base_len`
    # of its slice of the base index (filtered in place); of a merged token, `_pos[t]`.
    self._base_len = np.diff(self._base_start)
    self._pos = {}

  def owners(self, cells: np.ndarray) -> np.ndarray:
    """The anchors (global cell ids) of the tokens covering `cells`."""
    return cells // self.hw * self.hw + np.take(self.own, cells)

  def positions(self, t: int) -> np.ndarray:
    """Anchors that may hold token t (a superset; filter with `tok == t`)."""
    if t < self.geo.base:
      return self._base_order[self._base_start[t]:self._base_start[t] + self._base_len[t]]
    return self._pos.get(t, np.zeros(0, np.int64))

  def _keep_positions(self, t: int, anchors: np.ndarray):
    """Narrows token t's candidates to `anchors` (a subset of `positions(t)`, in order)."""
    if t < self.geo.base:  # into its own slice: no copy of a base code's anchors is kept
      lo = self._base_start[t]
      self._base_order[lo:lo + anchors.size] = anchors
      self._base_len[t] = anchors.size
    else:
      self._pos[t] = anchors

  def shift(self, g: np.ndarray, dy, dx):
    """(g + (dy, dx), in-bounds mask); dy, dx scalars or arrays broadcasting with g."""
    row = g // self.w  # numpy divides by a scalar fast (libdivide), see `_mod`
    y = _mod(row, self.h) + dy
    x = g - row * self.w + dx
    ok = (y >= 0) & (y < self.h) & (x >= 0) & (x < self.w)
    return g + dy * self.w + dx, ok

  def find_merge(self, a: int, b: int, delta) -> tuple[np.ndarray, np.ndarray]:
    """Anchors (p, q = p + delta) of the (a, b) occurrences that merge, in raster order.

    Every a at p with b at p + delta merges; when a == b, occurrences form chains
    p, p + delta, p + 2 delta, ... and greedy raster order takes every other one.
    """
    cand = self.positions(a)
    cand = cand[self.tok[cand] == a]
    self._keep_positions(a, cand)
    q, ok = self.shift(cand, delta[0], delta[1])
    ok[ok] = self.tok[q[ok]] == b
    p, q = cand[ok], q[ok]
    if a == b and p.size:
      mark = self.scratch
      mark[p] = True
      rank = np.zeros(p.size, np.int64)  # number of chained predecessors
      cur, alive = p, np.ones(p.size, bool)
      while alive.any():
        cur, ok = self.shift(cur, -delta[0], -delta[1])
        alive &= ok
        alive[alive] = mark[cur[alive]]
        rank += alive
      mark[p] = False
      take = rank % 2 == 0
      p, q = p[take], q[take]
    return p, q

  def commit_merge(self, b: int, p: np.ndarray, q: np.ndarray, t: int):
    """Puts token t at anchors p and marks the cells of the b tokens at q as covered."""
    self.tok[p] = t
    self.tok[q] = -1
    fb = self.geo.footprint(b)
    cells = q[:, None] + (fb[:, 0] * self.w + fb[:, 1])[None, :]  # [M, cells of b]
    self.own[cells] = _mod(p, self.hw)[:, None]
    self._keep_positions(t, p)

  def neighbours(self, anchors: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """All (anchor, neighbour anchor) pairs of tokens `t` at `anchors`, each neighbour once."""
    halo = self.geo.halo(t)                                         # [K, 2]
    ly, lx = self._yx
    inside = ((ly[None] + halo[:, :1] >= 0) & (ly[None] + halo[:, :1] < self.h) &
              (lx[None] + halo[:, 1:] >= 0) & (lx[None] + halo[:, 1:] < self.w))  # [K, HW]
    grid0 = anchors // self.hw * self.hw  # first cell of each anchor's grid
    ok = np.take(inside, anchors - grid0, axis=1)                   # [K, M]
    step = (halo[:, 0] * self.w + halo[:, 1]).astype(self.idx)
    cells = anchors[None, :] + step[:, None]                        # [K, M]
    # A cell inside the anchor's grid (ok) has the anchor's grid0, so its owner is grid0 +
    # own (`owners` without a divide); cells outside are masked, clipping keeps reads legal.
    own = np.take(self.own, cells, mode="clip").astype(self.idx)
    own += grid0[None, :]
    own[~ok] = -1
    if own.shape[0] <= 12:  # drop repeats by pairwise row tests (faster than column sorts)
      keep = ok
      for j in range(1, own.shape[0]):
        for i in range(j):
          keep[j] &= own[i] != own[j]
    else:
      own = np.sort(own, axis=0)
      keep = own >= 0
      keep[1:] &= own[1:] != own[:-1]
    rows = np.broadcast_to(anchors[None, :], own.shape)
    return rows[keep], own[keep]

  def pair_codes(self, x: np.ndarray, y: np.ndarray, vcap: int) -> np.ndarray:
    """Key `(a * vcap + b) * D + d` of neighbouring anchors x, y (either order).

    a, b are the tokens at the raster-earlier and later anchor; d indexes their offset
    (dy, dx), `d = dy * (2W - 1) + dx + W - 1`, `D = H * (2W - 1)`.
    """
    first, second = np.minimum(x, y), np.maximum(x, y)
    # second - first = dy * W + dx, and dy = (row of second) - (row of first) where a cell's
    # global row is its id // W; so d = (second - first) + dy * (W - 1) + W - 1.
    d = second - first + (second // self.w - first // self.w) * (self.w - 1) + (self.w - 1)
    ab = np.take(self.tok, first).astype(np.int64) * vcap + np.take(self.tok, second)
    return ab * (self.h * (2 * self.w - 1)) + d
