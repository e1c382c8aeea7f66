"""A batch of grids under merges: which token sits at each anchor, which anchor owns each cell.

Cells are numbered globally `g = n * H * W + y * W + x` (image n), so the raster order of
anchors inside one image is the order of `g`. `tok[g]` is the token anchored at g (-1 if g is
covered by another token); `own[g]` is the anchor of the token covering g. `find_merge` and
`commit_merge` are the one merge rule that learning and encoding share (see `vlbpe_jax.bpe`).
"""

import numpy as np

from vlbpe_jax.bpe import vocab as vocab_lib


class GridState:

  def __init__(self, grids: np.ndarray, geometry: vocab_lib.Geometry):
    self.n, self.h, self.w = grids.shape
    self.geo = geometry
    self.tok = np.ascontiguousarray(grids, np.int32).reshape(-1).copy()
    self.own = np.arange(self.tok.size, dtype=np.int64)
    self._mark = np.zeros(self.tok.size, bool)  # scratch, always all-False between calls
    order = np.argsort(self.tok, kind="stable")
    self._base_order = order
    self._base_start = np.searchsorted(self.tok[order], np.arange(geometry.base + 1))
    self._pos = {}  # token -> int64 candidate anchors (may be stale; checked on use)

  def positions(self, t: int) -> np.ndarray:
    """Anchors that may hold token t (a superset; filter with `tok == t`)."""
    if t in self._pos:
      return self._pos[t]
    if t < self.geo.base:
      return self._base_order[self._base_start[t]:self._base_start[t + 1]]
    return np.zeros(0, np.int64)

  def shift(self, g: np.ndarray, dy, dx):
    """(g + (dy, dx), in-bounds mask); dy, dx scalars or arrays broadcasting with g."""
    y = (g % (self.h * self.w)) // self.w + dy  # numpy divides by a scalar fast (libdivide)
    x = g % self.w + dx
    ok = (y >= 0) & (y < self.h) & (x >= 0) & (x < self.w)
    return g + dy * self.w + dx, ok

  def find_merge(self, a: int, b: int, delta) -> tuple[np.ndarray, np.ndarray]:
    """Anchors (p, q = p + delta) of the (a, b) occurrences that merge, in raster order.

    Every a at p with b at p + delta merges; when a == b, occurrences form chains
    p, p + delta, p + 2 delta, ... and greedy raster order takes every other one.
    """
    cand = self.positions(a)
    cand = cand[self.tok[cand] == a]
    self._pos[a] = cand
    q, ok = self.shift(cand, delta[0], delta[1])
    ok[ok] = self.tok[q[ok]] == b
    p, q = cand[ok], q[ok]
    if a == b and p.size:
      mark = self._mark
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
    self.own[cells] = p[:, None]
    self._pos[t] = p

  def neighbours(self, anchors: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """All (anchor, neighbour anchor) pairs of tokens `t` at `anchors`, each neighbour once."""
    halo = self.geo.halo(t)
    cells, ok = self.shift(anchors[:, None], halo[None, :, 0], halo[None, :, 1])  # [M, h]
    own = np.where(ok, self.own[np.where(ok, cells, 0)], -1)
    if own.shape[1] <= 12:  # drop repeats by pairwise column tests (faster than row sorts)
      keep = own >= 0
      for j in range(1, own.shape[1]):
        for i in range(j):
          keep[:, j] &= own[:, i] != own[:, j]
    else:
      own.sort(axis=1)
      keep = own >= 0
      keep[:, 1:] &= own[:, 1:] != own[:, :-1]
    rows = np.broadcast_to(anchors[:, None], own.shape)
    return rows[keep], own[keep]

  def pair_codes(self, x: np.ndarray, y: np.ndarray, vcap: int) -> np.ndarray:
    """Key `(a * vcap + b) * D + d` of neighbouring anchors x, y (either order).

    a, b are the tokens at the raster-earlier and later anchor; d indexes their offset
    (dy, dx), `d = dy * (2W - 1) + dx + W - 1`, `D = H * (2W - 1)`.
    """
    first, second = np.minimum(x, y), np.maximum(x, y)
    hw = self.h * self.w
    dy = (second % hw) // self.w - (first % hw) // self.w
    dx = second % self.w - first % self.w
    d = dy * (2 * self.w - 1) + dx + self.w - 1
    ab = self.tok[first].astype(np.int64) * vcap + self.tok[second]
    return ab * (self.h * (2 * self.w - 1)) + d
