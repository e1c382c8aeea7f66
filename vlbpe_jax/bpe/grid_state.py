"""A batch of grids under merges: which token sits at each anchor, which anchor owns each cell.

Cells are numbered globally `g = n * H * W + y * W + x` (image n), so the raster order of
anchors inside one image is the order of `g`. `tok[g]` is the token anchored at g (-1 if g is
covered by another token); `owners(g)` is the anchor of the token covering g, stored as its
index inside g's grid (`own`, int16 while H * W < 2**15). `find_merge` and
`commit_merge` are the one merge rule that learning and encoding share (see `vlbpe_jax.bpe`).

Memory per cell: 2 bytes of token (int16 while every token id < 2**15, else 4), 2 of owner
(its index in the grid; 4 for grids of 2**15 cells or more), 4 of base-code index (int32 cell
ids below 2**31 cells), 1 of scratch flags.

Encoding needs no owners (`find_merge` reads anchors only): `GridState(..., owners=False)`
keeps none and holds cell ids as intp, as numpy indexes with them (an int32 index array is
converted on every gather or scatter, which costs as much as the gather itself): 2 + 8 + 1
bytes per cell, for the grids of one encoding chunk at a time.
"""

_INDEX_CHUNK = 1 << 20  # cells per argsort while building the base-code index (cache-sized)
_ONE_SORT = 1 << 24  # up to this many cells, an intp index is one argsort (encoding chunks)

import numpy as np

from vlbpe_jax.bpe import vocab as vocab_lib


def _mod(x: np.ndarray, n: int) -> np.ndarray:
  """`x % n` for x >= 0 and a positive int n: numpy's integer `%` does not use the fast
  divide by a scalar that `//` does (2.2x slower on int32 cell ids, and cell ids are the hot
  path); a power of two is one `&`."""
  if n & (n - 1) == 0:
    return x & (n - 1)
  return x - x // n * n


def _base_index(tok: np.ndarray, base: int, idx) -> tuple[np.ndarray, np.ndarray]:
  """Cells grouped by base code, ascending within a code (a stable argsort of `tok`), built
  a chunk at a time so that no int64 array of all cells is made; and each code's start.
  (`np.bincount` converts its input to intp: counted whole, the cells would be copied.)"""
  chunks = range(0, tok.size, _INDEX_CHUNK)
  count = sum((np.bincount(tok[lo:lo + _INDEX_CHUNK], minlength=base) for lo in chunks),
              np.zeros(base, np.int64))
  start = np.concatenate([[0], np.cumsum(count)])
  # Base codes in [0, V), V <= 65536: a 16-bit stable argsort is a radix sort.
  key = (lambda x: x.astype(np.uint16)) if base <= 1 << 16 else (lambda x: x)
  if np.dtype(idx) == np.intp and tok.size <= _ONE_SORT:
    return np.argsort(key(tok), kind="stable"), start  # argsort returns intp
  order = np.empty(tok.size, idx)
  fill = start[:-1].copy()  # next free place of each code
  for lo in chunks:
    part = tok[lo:lo + _INDEX_CHUNK]
    o = np.argsort(key(part), kind="stable")
    c = np.bincount(part, minlength=base)
    # The i-th sorted cell, of code k, goes to fill[k] + i - (sorted cells before code k).
    order[np.arange(o.size) + np.repeat(fill - (np.cumsum(c) - c), c)] = o + lo
    fill += c
  return order, start


class GridState:

  def __init__(self, grids: np.ndarray, geometry: vocab_lib.Geometry, capacity: int = 0,
               owners: bool = True):
    """grids: int [N, H, W] base codes; capacity: every token id will stay below it (0: 2**31);
    owners: keep each cell's owner (learning, `visualize`); without, cell ids are intp.
    """
    self.n, self.h, self.w = grids.shape
    self.geo = geometry
    narrow = 0 < capacity <= np.iinfo(np.int16).max
    # One grid of -1 after the cells: a step of at most one grid past either end of the
    # array (negative indices read from the end) lands on it, never on a token.
    self._padded = np.full(grids.size + grids.shape[1] * grids.shape[2], -1,
                           np.int16 if narrow else np.int32)
    self._padded[:grids.size] = grids.reshape(-1)
    self.tok = self._padded[:grids.size]
    # Cell ids in int32 when every id +- one grid fits (halves the memory traffic).
    small = (self.n + 2) * self.h * self.w < np.iinfo(np.int32).max
    self.idx = np.int32 if small and owners else np.int64
    self.hw = self.h * self.w
    local = np.arange(self.hw)
    self.own = None  # owner's index inside its grid
    if owners:
      self.own = np.tile(
          local.astype(np.int16 if self.hw <= np.iinfo(np.int16).max else np.int32), self.n)
    self.scratch = np.zeros(self.tok.size, bool)  # cell flags, all-False between uses
    self._yx = local // self.w, local % self.w  # row, col of each cell of one grid
    self._base_order, self._base_start = _base_index(self.tok, geometry.base, self.idx)
    # Candidate anchors (may be stale; checked on use): of a base code, the first `_base_len`
    # of its slice of the base index (filtered in place); of a merged token, `_pos[t]`.
    self._base_len = np.diff(self._base_start)
    self._pos = {}
    self._inside = {}  # (dy, dx) -> in-grid mask over a grid's cells (`_in_grid`)

  def _need_owners(self, what: str):
    if self.own is None:
      raise ValueError(f"{what}: this GridState keeps no owners (owners=False); expected one "
                       "made with owners=True")

  def owners(self, cells: np.ndarray) -> np.ndarray:
    """The anchors (global cell ids) of the tokens covering `cells`."""
    self._need_owners("owners")
    return cells // self.hw * self.hw + np.take(self.own, cells)

  def num_positions(self, t: int) -> int:
    """The size of `positions(t)`."""
    if t < self.geo.base:
      return int(self._base_len[t])
    return self._pos[t].size if t in self._pos else 0

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

  def _in_grid(self, dy: int, dx: int) -> np.ndarray:
    """[H * W] mask: which cells of a grid have their (dy, dx) neighbour in the grid (kept)."""
    table = self._inside.get((dy, dx))
    if table is None:
      ly, lx = self._yx
      table = (ly + dy >= 0) & (ly + dy < self.h) & (lx + dx >= 0) & (lx + dx < self.w)
      self._inside[(dy, dx)] = table
    return table

  def inside(self, g: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Mask of the cells g whose (dy, dx) neighbour lies in their own grid."""
    return self._in_grid(dy, dx)[_mod(g, self.hw)]

  def _live(self, t: int) -> np.ndarray:
    """The anchors that hold token t now (its candidates narrowed to them)."""
    cand = self.positions(t)
    live = cand[self.tok[cand] == t]
    if live.size < cand.size:
      self._keep_positions(t, live)
    return live

  def find_merge(self, a: int, b: int, delta) -> tuple[np.ndarray, np.ndarray]:
    """Anchors (p, q = p + delta) of the (a, b) occurrences that merge, in raster order.

    Every a at p with b at p + delta merges; when a == b, occurrences form chains
    p, p + delta, p + 2 delta, ... and greedy raster order takes every other one.
    """
    dy, dx = int(delta[0]), int(delta[1])
    step = dy * self.w + dx
    # From the side with fewer candidate anchors (each filtered to its live ones): the a's
    # with a b at +step, or the b's with an a at -step. A step past either end of the cells
    # reads the padding; a step across a row or grid edge may land on a match, which the
    # grid bounds of the few matches then reject.
    if a == b or self.num_positions(a) <= self.num_positions(b):
      live = self._live(a)
      p = live[self._padded[live + step] == b]
    else:
      live = self._live(b)
      p = live[self._padded[live - step] == a] - step
    ok = self.inside(p, dy, dx)
    if not ok.all():
      p = p[ok]
    q = p + step
    if a == b and p.size:
      mark = self.scratch
      mark[p] = True
      rank = np.zeros(p.size, np.int64)  # number of chained predecessors
      cur, alive = p, np.ones(p.size, bool)
      while alive.any():
        alive &= self.inside(cur, -dy, -dx)
        cur = cur - step
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
    self._keep_positions(t, p)
    if self.own is None:
      return
    fb = self.geo.footprint(b)
    cells = q[:, None] + (fb[:, 0] * self.w + fb[:, 1])[None, :]  # [M, cells of b]
    self.own[cells] = _mod(p, self.hw)[:, None]

  def neighbours(self, anchors: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """All (anchor, neighbour anchor) pairs of tokens `t` at `anchors`, each neighbour once."""
    self._need_owners("neighbours")
    halo = self.geo.halo(t)                                         # [K, 2]
    inside = np.stack([self._in_grid(int(dy), int(dx)) for dy, dx in halo])  # [K, HW]
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
