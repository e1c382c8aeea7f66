"""Token geometry of a visual BPE vocabulary: footprints, halos and base-code expansions.

A token's footprint is the set of cells it covers, as `(dy, dx)` offsets from its anchor (its
raster-first cell, so every offset has `dy > 0` or `dy == 0, dx >= 0`). A base code covers
`{(0, 0)}`; merge `(a, b, delta) -> t` covers `fp(a) | (delta + fp(b))`. The halo is the set of
cells adjacent to the footprint (through +-offsets of the cell window) but outside it.
"""

import numpy as np

DEFAULT_OFFSETS = ((0, 1), (1, 0))  # right, down: 4-connectivity
# Most tokens (base codes + merges) a vocabulary may hold: 16.7M, far above any VQ codebook
# plus merge budget; bounds the learner's pair keys and tables (and keeps ids int32).
MAX_VOCAB_SIZE = 2**24


def is_int(value) -> bool:
  """True for a Python or numpy integer (not a bool, not an integral float like 3.0)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, lo: int, hi=None) -> int:
  """`value` as an int in [lo, hi) (hi=None: no upper bound) or ValueError naming it."""
  want = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
  if not is_int(value):
    raise ValueError(f"{name}={value!r}: expected an integer {want}")
  if value < lo or (hi is not None and value >= hi):
    raise ValueError(f"{name}={value!r}: expected an integer {want}")
  return int(value)


def check_offsets(offsets) -> tuple[tuple[int, int], ...]:
  """Validates the cell window: distinct raster-forward `(dy, dx)` offsets."""
  try:
    pairs = [tuple(o) for o in offsets]
  except TypeError as e:
    raise ValueError(f"offsets={offsets!r}: expected a sequence of (dy, dx) int pairs") from e
  if not all(len(o) == 2 and all(is_int(v) for v in o) for o in pairs):
    raise ValueError(f"offsets={offsets!r}: expected a sequence of (dy, dx) int pairs")
  out = tuple((int(dy), int(dx)) for dy, dx in pairs)
  if not out or len(set(out)) != len(out):
    raise ValueError(f"offsets={offsets!r}: expected a non-empty list of distinct (dy, dx)")
  for dy, dx in out:
    if not (dy > 0 or (dy == 0 and dx > 0)):
      raise ValueError(f"offsets={offsets!r}: ({dy}, {dx}) is not raster-forward; expected "
                       "dy > 0, or dy == 0 and dx > 0")
  return out


def parse_offsets(text: str) -> tuple[tuple[int, int], ...]:
  """"0,1;1,0" -> ((0, 1), (1, 0)), validated by `check_offsets`."""
  try:
    out = tuple(tuple(int(v) for v in part.split(",")) for part in text.split(";") if part)
  except ValueError as e:
    raise ValueError(f"offsets={text!r}: expected 'dy,dx;dy,dx;...'") from e
  return check_offsets(out)


class Geometry:
  """Footprints, halos and expansions of base codes `[0, V)` plus merged tokens `V + k`."""

  def __init__(self, base_vocab_size: int, offsets):
    self.base = int(base_vocab_size)
    self.offsets = check_offsets(offsets)
    self.merges = []  # (a, b, (dy, dx)) per merged token
    origin = np.zeros((1, 2), np.int64)
    self._fp = {None: origin}  # key None: every base code
    self._code = {}            # merged token -> int32 [cells] base codes, in footprint order
    self._halo = {}

  def add(self, a: int, b: int, delta) -> int:
    """Registers merge `(a, b, delta)`; returns the new token id.

    a, b: earlier token ids (ints in [0, size)); delta: raster-forward int pair (dy, dx) such
    that b's footprint moved by delta does not overlap a's. Anything else raises ValueError.
    """
    t = self.base + len(self.merges)
    a, b = check_int("a", a, 0, t), check_int("b", b, 0, t)
    if (not isinstance(delta, (list, tuple, np.ndarray)) or len(delta) != 2
        or not all(is_int(v) for v in delta)):
      raise ValueError(f"offset={delta!r}: expected a (dy, dx) pair of ints")
    dy, dx = int(delta[0]), int(delta[1])
    if not (dy > 0 or (dy == 0 and dx > 0)):
      raise ValueError(f"offset={delta!r}: expected a raster-forward (dy, dx): dy > 0, or "
                       "dy == 0 and dx > 0")
    cells = np.concatenate([self.footprint(a), self.footprint(b) + [dy, dx]])
    if len({tuple(c) for c in cells.tolist()}) != len(cells):
      raise ValueError(f"merge ({a}, {b}) at offset ({dy}, {dx}): the footprints overlap; "
                       "expected disjoint footprints")
    self.merges.append((a, b, (dy, dx)))
    order = np.lexsort((cells[:, 1], cells[:, 0]))  # raster order
    self._fp[t] = cells[order]
    self._code[t] = np.concatenate([self.codes(a), self.codes(b)])[order].astype(np.int32)
    return t

  @property
  def size(self) -> int:
    return self.base + len(self.merges)

  def footprint(self, t: int) -> np.ndarray:
    """int64 [cells, 2] offsets `(dy, dx)` of token `t`, raster order, `(0, 0)` first."""
    return self._fp[None if t < self.base else t]

  def codes(self, t: int) -> np.ndarray:
    """int32 [cells] base codes of token `t`, in footprint order."""
    return np.array([t], np.int32) if t < self.base else self._code[t]

  def halo(self, t: int) -> np.ndarray:
    """int64 [h, 2]: cells adjacent to `t`'s footprint (via +-offsets), outside it, sorted."""
    key = None if t < self.base else t
    if key not in self._halo:
      fp = self.footprint(t)
      win = np.array(self.offsets, np.int64)
      near = (fp[:, None, :] + np.concatenate([win, -win])[None]).reshape(-1, 2)
      inside = {tuple(c) for c in fp.tolist()}
      cells = sorted({tuple(c) for c in near.tolist()} - inside)
      self._halo[key] = np.array(cells, np.int64).reshape(-1, 2)
    return self._halo[key]
