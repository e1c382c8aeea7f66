"""Exact sparse counters keyed by int64, with vectorised lookup and insert.

`SlotMap` gives every key a fixed slot (its insertion rank), so per-key values live in plain
numpy arrays indexed by slot. The key -> slot index is a large sorted array plus a small sorted
overflow that is folded in when it grows, so inserting a few thousand keys per merge never
copies the whole index.
"""

import numpy as np


def ranges_to_indices(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Concatenated `arange(lo[i], hi[i])` for all i, and the i of each element."""
  lens = hi - lo
  which = np.repeat(np.arange(lo.size), lens)
  first = np.cumsum(lens) - lens
  return np.arange(which.size) - first[which] + lo[which], which


class SlotMap:
  """int64 keys -> slots 0, 1, 2, ... in insertion order; `keys[slot]` gives the key back."""

  def __init__(self, sorted_keys: np.ndarray):
    sorted_keys = np.asarray(sorted_keys, np.int64)
    self.size = sorted_keys.size
    self._keys = sorted_keys.copy()
    self._main = (sorted_keys, np.arange(self.size, dtype=np.int64))
    self._over = (np.zeros(0, np.int64), np.zeros(0, np.int64))

  @property
  def keys(self) -> np.ndarray:
    return self._keys[:self.size]

  def lookup(self, q: np.ndarray) -> np.ndarray:
    """Slots of keys `q` (-1 where absent)."""
    out = np.full(q.size, -1, np.int64)
    for ks, ss in (self._main, self._over):
      if ks.size:
        i = np.minimum(np.searchsorted(ks, q), ks.size - 1)
        hit = ks[i] == q
        out[hit] = ss[i[hit]]
    return out

  def insert(self, q: np.ndarray) -> np.ndarray:
    """Adds keys `q` (unique, sorted, all absent); returns their new slots."""
    slots = np.arange(self.size, self.size + q.size, dtype=np.int64)
    self.size += q.size
    if self._keys.size < self.size:
      grown = np.empty(max(self.size, 2 * self._keys.size), np.int64)
      grown[:self._keys.size] = self._keys
      self._keys = grown
    self._keys[slots] = q
    ok, os_ = self._over
    at = np.searchsorted(ok, q)
    self._over = (np.insert(ok, at, q), np.insert(os_, at, slots))
    if self._over[0].size > max(1 << 14, self._main[0].size // 6):  # fold in: one merge pass
      (mk, ms), (ok, os_) = self._main, self._over
      at = np.searchsorted(mk, ok)
      self._main = (np.insert(mk, at, ok), np.insert(ms, at, os_))
      self._over = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    return slots


def grow(arr: np.ndarray, size: int) -> np.ndarray:
  """`arr` with room for `size` entries (doubling; new entries zero)."""
  if arr.size >= size:
    return arr
  out = np.zeros(max(size, 2 * arr.size), arr.dtype)
  out[:arr.size] = arr
  return out
