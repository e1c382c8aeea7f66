"""Exact sparse counters keyed by int64, with vectorised lookup and insert.

`SlotMap` gives every key a fixed slot (its insertion rank), so per-key values live in plain
numpy arrays indexed by slot. The key -> slot index is a large sorted array (to which keys
above all others are appended) plus a small sorted overflow that is folded in when it grows,
so inserting a few thousand keys per merge never copies the whole index.
"""

import numpy as np


def ranges_to_indices(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Concatenated `arange(lo[i], hi[i])` for all i, and the i of each element."""
  lens = hi - lo
  which = np.repeat(np.arange(lo.size), lens)
  first = np.cumsum(lens) - lens
  return np.arange(which.size) - first[which] + lo[which], which


class SlotMap:
  """int64 keys -> slots 0, 1, 2, ... in insertion order; `keys[slot]` gives the key back.

  Keys larger than every stored key are appended to the sorted index (amortised O(1) each);
  others go to the overflow.
  """

  def __init__(self, keys: np.ndarray):
    self.size = 0
    self._keys = np.zeros(0, np.int64)
    self._mk, self._ms, self._m = np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    self._over = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    self.insert(np.asarray(keys, np.int64))

  @property
  def keys(self) -> np.ndarray:
    return self._keys[:self.size]

  def lookup(self, q: np.ndarray) -> np.ndarray:
    """Slots of keys `q` (-1 where absent)."""
    out = np.full(q.size, -1, np.int64)
    for ks, ss in ((self._mk[:self._m], self._ms[:self._m]), self._over):
      if ks.size:
        i = np.minimum(np.searchsorted(ks, q), ks.size - 1)
        hit = ks[i] == q
        out[hit] = ss[i[hit]]
    return out

  def insert(self, q: np.ndarray) -> np.ndarray:
    """Adds keys `q` (distinct, all absent); returns their new slots, in the order of `q`."""
    slots = np.arange(self.size, self.size + q.size, dtype=np.int64)
    self.size += q.size
    self._keys = grow(self._keys, self.size)
    self._keys[slots] = q
    if not q.size:
      return slots
    order = np.argsort(q)
    q, qs = q[order], slots[order]
    ok, os_ = self._over
    if not self._m or q[0] > self._mk[self._m - 1]:  # append
      end = self._m + q.size
      self._mk, self._ms = grow(self._mk, end), grow(self._ms, end)
      self._mk[self._m:end], self._ms[self._m:end] = q, qs
      self._m = end
      return slots
    at = np.searchsorted(ok, q)
    self._over = (np.insert(ok, at, q), np.insert(os_, at, qs))
    if self._over[0].size > max(1 << 14, self._m // 6):  # fold in: one merge pass
      (ok, os_), mk, ms = self._over, self._mk[:self._m], self._ms[:self._m]
      at = np.searchsorted(mk, ok)
      self._mk, self._ms = np.insert(mk, at, ok), np.insert(ms, at, os_)
      self._m = self._mk.size
      self._over = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    return slots


def grow(arr: np.ndarray, size: int) -> np.ndarray:
  """`arr` with room for `size` entries (doubling; new entries zero)."""
  if arr.size >= size:
    return arr
  out = np.zeros(max(size, 2 * arr.size), arr.dtype)
  out[:arr.size] = arr
  return out
