"""`VisualBPE`: learn, encode, decode, save and load a 2D visual BPE vocabulary."""

import json
import os

import numpy as np

from vlbpe_jax.bpe import grid_state
from vlbpe_jax.bpe import learner
from vlbpe_jax.bpe import vocab as vocab_lib

FORMAT = "vlbpe_jax.visual_bpe"
ENCODING_KEYS = ("tokens", "positions", "lengths", "cells", "grid_shape")


def check_grids(grids, base_vocab_size: int, name: str = "grids") -> np.ndarray:
  """int32 [N, H, W] codes in [0, V) or ValueError."""
  if not isinstance(grids, np.ndarray) and hasattr(grids, "__array__"):
    grids = np.asarray(grids)
  if not isinstance(grids, np.ndarray):
    raise ValueError(f"{name}: expected an integer numpy array [N, H, W], got {type(grids)}")
  if grids.dtype == bool or not np.issubdtype(grids.dtype, np.integer):
    raise ValueError(f"{name} has dtype {grids.dtype}: expected an integer dtype (int32)")
  if grids.ndim != 3 or grids.shape[1] < 1 or grids.shape[2] < 1:
    raise ValueError(f"{name} has shape {grids.shape}: expected [N, H, W] with H, W >= 1")
  if grids.size:
    lo, hi = int(grids.min()), int(grids.max())
    if lo < 0:
      raise ValueError(f"{name} holds the negative code {lo}: expected codes in "
                       f"[0, {base_vocab_size})")
    if hi >= base_vocab_size:
      raise ValueError(f"{name} holds code {hi}: expected codes < base_vocab_size="
                       f"{base_vocab_size}")
  return np.ascontiguousarray(grids, np.int32)


class VisualBPE:
  """A learned 2D BPE vocabulary: base codes `[0, V)` plus merged tokens `V + k`."""

  def __init__(self, base_vocab_size: int, merges, offsets=vocab_lib.DEFAULT_OFFSETS,
               alpha: float = 0.0, sigma: float = 0.5, min_count: int = 2):
    if int(base_vocab_size) < 1:
      raise ValueError(f"base_vocab_size={base_vocab_size}: expected >= 1")
    self.geometry = vocab_lib.Geometry(base_vocab_size, offsets)
    self.alpha, self.sigma, self.min_count = float(alpha), float(sigma), int(min_count)
    self.merges = [dict(m) for m in merges]
    self._exp = None  # decode tables, built on first use
    for k, m in enumerate(self.merges):
      t = self.geometry.size
      if int(m.get("id", t)) != t or not (0 <= m["a"] < t and 0 <= m["b"] < t):
        raise ValueError(f"merge {k} {m}: expected id {t} and a, b in [0, {t}) "
                         f"(vocabulary of base size {base_vocab_size} and {k} earlier merges)")
      self.geometry.add(m["a"], m["b"], m["offset"])
      m["id"] = t
    self._sizes = np.array([1] * self.base_vocab_size +
                           [len(self.geometry.codes(t)) for t in range(
                               self.base_vocab_size, self.vocab_size)], np.int32)

  @property
  def base_vocab_size(self) -> int:
    return self.geometry.base

  @property
  def vocab_size(self) -> int:
    return self.geometry.size

  @property
  def offsets(self):
    return self.geometry.offsets

  def footprint(self, t: int) -> np.ndarray:
    """int64 [cells, 2] (dy, dx) of token t from its anchor."""
    self._check_token(t)
    return self.geometry.footprint(t)

  def _check_token(self, t):
    if not 0 <= t < self.vocab_size:
      raise ValueError(f"token {t}: expected an id in [0, {self.vocab_size})")

  @classmethod
  def learn(cls, grids, base_vocab_size: int, num_merges: int, alpha: float = 1.0,
            sigma: float = 0.5, offsets=vocab_lib.DEFAULT_OFFSETS, min_count: int = 2,
            mesh=None, progress: bool = True, return_timing: bool = False):
    """Learns up to `num_merges` merges from int grids [N, H, W] of codes in [0, V)."""
    grids = check_grids(grids, base_vocab_size)
    if int(num_merges) < 0:
      raise ValueError(f"num_merges={num_merges}: expected >= 0")
    if not alpha >= 0 or not sigma > 0:
      raise ValueError(f"alpha={alpha}, sigma={sigma}: expected alpha >= 0 and sigma > 0")
    if int(min_count) < 1:
      raise ValueError(f"min_count={min_count}: expected >= 1")
    offsets = vocab_lib.check_offsets(offsets)
    _, records, timing = learner.learn(grids, int(base_vocab_size), int(num_merges),
                                       float(alpha), float(sigma), offsets, int(min_count),
                                       mesh=mesh, progress=progress)
    bpe = cls(base_vocab_size, records, offsets, alpha, sigma, min_count)
    return (bpe, timing) if return_timing else bpe

  def tokenize(self, grids) -> grid_state.GridState:
    """Applies every merge, in learned order, to grids [N, H, W]; returns the grid state."""
    grids = check_grids(grids, self.base_vocab_size)
    state = grid_state.GridState(grids, self.geometry)
    for k, (a, b, delta) in enumerate(self.geometry.merges):
      if state.positions(a).size:
        p, q = state.find_merge(a, b, delta)
        if p.size:
          state.commit_merge(b, p, q, self.base_vocab_size + k)
    return state

  def encode(self, grids) -> dict:
    """Tokens of grids [N, H, W] in raster order of their anchors.

    Returns numpy arrays: tokens int32 [N, L] (-1 = padding), positions int32 [N, L, 2] (row,
    col of each anchor), cells int32 [N, L] (footprint sizes), lengths int32 [N], grid_shape
    int32 [2]; L is the longest sequence in the batch.
    """
    state = self.tokenize(grids)
    hw = state.h * state.w
    anchors = np.flatnonzero(state.tok >= 0)
    img = anchors // hw
    lengths = np.bincount(img, minlength=state.n).astype(np.int32)
    col = np.arange(anchors.size) - (np.cumsum(lengths) - lengths)[img]
    width = int(lengths.max()) if state.n else 0
    tokens = np.full((state.n, width), -1, np.int32)
    positions = np.zeros((state.n, width, 2), np.int32)
    cells = np.zeros((state.n, width), np.int32)
    tokens[img, col] = state.tok[anchors]
    positions[img, col, 0] = (anchors % hw) // state.w
    positions[img, col, 1] = anchors % state.w
    cells[img, col] = self._sizes[tokens[img, col]]
    return dict(tokens=tokens, positions=positions, cells=cells, lengths=lengths,
                grid_shape=np.array([state.h, state.w], np.int32))

  def decode(self, encoding: dict) -> np.ndarray:
    """Base-code grids int32 [N, H, W] from `encode`'s output."""
    missing = [k for k in ("tokens", "positions", "lengths", "grid_shape") if k not in encoding]
    if missing:
      raise ValueError(f"encoding lacks {missing}: expected the dict returned by encode")
    tokens = np.asarray(encoding["tokens"])
    positions = np.asarray(encoding["positions"])
    lengths = np.asarray(encoding["lengths"])
    h, w = (int(v) for v in np.asarray(encoding["grid_shape"]))
    n, width = tokens.shape
    if positions.shape != (n, width, 2) or lengths.shape != (n,):
      raise ValueError(f"encoding shapes tokens {tokens.shape}, positions {positions.shape}, "
                       f"lengths {lengths.shape}: expected [N, L], [N, L, 2], [N]")
    valid = np.arange(width)[None, :] < lengths[:, None]
    toks = tokens[valid].astype(np.int64)
    if toks.size and (toks.min() < 0 or toks.max() >= self.vocab_size):
      raise ValueError(f"encoding holds token ids in [{toks.min()}, {toks.max()}]: expected ids "
                       f"in [0, {self.vocab_size}) of this vocabulary")
    img = np.nonzero(valid)[0]
    pos = positions[valid].astype(np.int64)
    ptr, fy, fx, fcode = self._expansions()
    size = ptr[toks + 1] - ptr[toks]
    which = np.repeat(np.arange(toks.size), size)  # one entry per covered cell
    flat = np.arange(which.size) - (np.cumsum(size) - size)[which] + ptr[toks][which]
    y, x = pos[which, 0] + fy[flat], pos[which, 1] + fx[flat]
    if y.size and (y.min() < 0 or y.max() >= h or x.min() < 0 or x.max() >= w):
      raise ValueError(f"encoding places tokens outside the {h}x{w} grid")
    g = (img[which] * h + y) * w + x
    out = np.full(n * h * w, -1, np.int32)
    out[g] = fcode[flat]
    if g.size != out.size or (np.bincount(g, minlength=out.size) != 1).any():
      raise ValueError("encoding does not cover every cell exactly once: tokens overlap or "
                       "leave gaps; expected the output of encode with this vocabulary")
    return out.reshape(n, h, w)

  def _expansions(self):
    """CSR of every token's cells: ptr [V'+1], dy, dx, base code per cell (cached)."""
    if self._exp is None:
      ts = range(self.vocab_size)
      fps = [self.geometry.footprint(t) for t in ts]
      ptr = np.concatenate([[0], np.cumsum([len(f) for f in fps])]).astype(np.int64)
      cells = np.concatenate(fps)
      codes = np.concatenate([self.geometry.codes(t) for t in ts])
      self._exp = (ptr, cells[:, 0], cells[:, 1], codes.astype(np.int32))
    return self._exp

  def to_dict(self) -> dict:
    merges = []
    for m in self.merges:
      m = dict(m)
      m["footprint"] = self.geometry.footprint(m["id"]).tolist()
      merges.append(m)
    return dict(format=FORMAT, version=1, base_vocab_size=self.base_vocab_size,
                vocab_size=self.vocab_size, offsets=[list(o) for o in self.offsets],
                alpha=self.alpha, sigma=self.sigma, min_count=self.min_count, merges=merges)

  def save(self, path: str):
    """Writes a readable JSON vocabulary (one merge per line)."""
    d = self.to_dict()
    merges = d.pop("merges")
    head = json.dumps(d)[:-1]
    body = ",\n".join("  " + json.dumps(m) for m in merges)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      f.write(f'{head}, "merges": [\n{body}\n]}}\n')

  @classmethod
  def load(cls, path: str) -> "VisualBPE":
    with open(path) as f:
      d = json.load(f)
    if d.get("format") != FORMAT:
      raise ValueError(f"{path}: format {d.get('format')!r}, expected {FORMAT!r}")
    bpe = cls(d["base_vocab_size"], d["merges"], d["offsets"], d["alpha"], d["sigma"],
              d["min_count"])
    for m in d["merges"]:
      if "footprint" in m and bpe.geometry.footprint(m["id"]).tolist() != m["footprint"]:
        raise ValueError(f"{path}: merge {m['id']} footprint {m['footprint']} does not match "
                         "its (a, b, offset)")
    if d.get("vocab_size", bpe.vocab_size) != bpe.vocab_size:
      raise ValueError(f"{path}: vocab_size {d['vocab_size']} != base + merges "
                       f"({bpe.vocab_size})")
    return bpe
