"""`VisualBPE`: learn, encode, decode, save and load a 2D visual BPE vocabulary.

A vocabulary holds at most `vocab.MAX_VOCAB_SIZE` (2**24) tokens, base codes included.
"""

import concurrent.futures
import mmap
import multiprocessing
import numbers

import numpy as np

from vlbpe_jax import fileio
from vlbpe_jax.bpe import grid_state
from vlbpe_jax.bpe import learner
from vlbpe_jax.bpe import vocab as vocab_lib

FORMAT = "vlbpe_jax.visual_bpe"
ENCODING_KEYS = ("tokens", "positions", "lengths", "cells", "grid_shape")
MAX_VOCAB_SIZE = vocab_lib.MAX_VOCAB_SIZE
_MERGE_INTS = ("count", "offset_count", "merged")  # optional learning statistics
_MERGE_FLOATS = ("F", "S", "P")
# Cells per encoding chunk by default: 8192 grids of 32 x 32 (the fastest size per core on
# 10^5 such grids, BENCHMARKS.md "At Being-VL scale"; one chunk's token array is 16 MB).
ENCODE_CHUNK_CELLS = 1 << 23
_WORKER = None  # (vocabulary, grids, chunk) of a forked encoding worker (`_set_worker`)


def _empty(shape, dtype) -> np.ndarray:
  """`np.empty` in pages of the system's default size: its own anonymous private mapping,
  without the huge-page hint that numpy gives the kernel for large arrays.

  For `encode`'s padded outputs (5.2 GB for 10^6 grids of 32x32): on a VM whose host takes
  back the guest's free memory (free page reporting; the Firecracker VM of BENCHMARKS.md), a
  huge page comes from memory given back, and its first touch cost ~20x a small page's there
  (1 GB of int32 filled: 13.8 s with numpy's hint, 0.66 s without); writing the outputs of
  10^6 grids took 11.6-11.8 s with the hint and 2.5-2.6 s without. Where the system maps all
  anonymous memory in huge pages (transparent huge pages "always"), it still does.
  """
  count = int(np.prod(shape))
  if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: no anonymous private mappings
    return np.empty(shape, dtype)
  buf = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize), flags=mmap.MAP_PRIVATE)
  return np.frombuffer(buf, dtype, count=count).reshape(shape)


def _set_worker(bpe, grids, chunk):
  global _WORKER
  _WORKER = bpe, grids, chunk


def _merge_in_worker(i):
  bpe, grids, chunk = _WORKER
  return bpe._merge_chunk(grids[i * chunk:(i + 1) * chunk])


def check_grids(grids, base_vocab_size=None, name: str = "grids",
                min_grids: int = 0, keep_int16: bool = False) -> np.ndarray:
  """int32 [N, H, W] codes in [0, V) or ValueError naming `name` and the bad value.

  base_vocab_size=None only checks codes >= 0 and < MAX_VOCAB_SIZE (see `infer_vocab_size`).
  keep_int16: int16 grids come back as they are (half the memory), not as an int32 copy.
  """
  if not isinstance(grids, np.ndarray) and hasattr(grids, "__array__"):
    grids = np.asarray(grids)
  if not isinstance(grids, np.ndarray):
    raise ValueError(f"{name}: expected an integer numpy array [N, H, W], got {type(grids)}")
  if grids.dtype == bool or not np.issubdtype(grids.dtype, np.integer):
    raise ValueError(f"{name} has dtype {grids.dtype}: expected an integer dtype (int32)")
  if grids.ndim != 3 or grids.shape[1] < 1 or grids.shape[2] < 1:
    raise ValueError(f"{name} has shape {grids.shape}: expected [N, H, W] with H, W >= 1")
  if grids.shape[0] < min_grids:
    raise ValueError(f"{name} has shape {grids.shape}: expected at least {min_grids} grid(s)")
  limit = MAX_VOCAB_SIZE if base_vocab_size is None else base_vocab_size
  if grids.size:
    lo, hi = int(grids.min()), int(grids.max())
    if lo < 0:
      raise ValueError(f"{name} holds the negative code {lo}: expected codes in [0, {limit})")
    if hi >= limit:
      what = (f"< base_vocab_size={base_vocab_size}" if base_vocab_size is not None else
              f"< {limit} (vocab.MAX_VOCAB_SIZE = 2**24)")
      raise ValueError(f"{name} holds code {hi}: expected codes {what}")
  if keep_int16 and grids.dtype == np.int16:
    return np.ascontiguousarray(grids)
  return np.ascontiguousarray(grids, np.int32)


def infer_vocab_size(grids, name: str = "grids") -> int:
  """max code + 1 of non-empty grids [N, H, W] (validated: integer codes in [0, 2**24))."""
  grids = check_grids(grids, None, name, min_grids=1)
  return int(grids.max()) + 1


def check_s_prior_count(s_prior_count) -> float:
  """The pseudo-count k of S's small-sample correction (`scoring`): a finite number >= 0."""
  v = s_prior_count
  if (not isinstance(v, numbers.Real) or isinstance(v, bool) or not np.isfinite(v)
      or not v >= 0):
    raise ValueError(f"s_prior_count={v!r}: expected a finite number >= 0 (0: no correction)")
  return float(v)


def _check_sizes(base_vocab_size, num_merges) -> tuple[int, int]:
  base = vocab_lib.check_int("base_vocab_size", base_vocab_size, 1, MAX_VOCAB_SIZE + 1)
  merges = vocab_lib.check_int("num_merges", num_merges, 0)
  if base + merges > MAX_VOCAB_SIZE:
    raise ValueError(f"base_vocab_size={base} + num_merges={merges} = {base + merges} tokens: "
                     f"expected at most {MAX_VOCAB_SIZE} (2**24)")
  return base, merges


class VisualBPE:
  """A learned 2D BPE vocabulary: base codes `[0, V)` plus merged tokens `V + k`."""

  def __init__(self, base_vocab_size: int, merges, offsets=vocab_lib.DEFAULT_OFFSETS,
               alpha: float = 0.0, sigma: float = 0.5, min_count: int = 2,
               s_prior_count: float = 0.0):
    if not isinstance(merges, (list, tuple)):
      raise ValueError(f"merges of type {type(merges).__name__}: expected a list of dicts")
    _check_sizes(base_vocab_size, len(merges))
    for name, v in (("alpha", alpha), ("sigma", sigma)):
      if not isinstance(v, numbers.Real) or isinstance(v, bool) or not np.isfinite(v):
        raise ValueError(f"{name}={v!r}: expected a finite number")
    if not alpha >= 0 or not sigma > 0:
      raise ValueError(f"alpha={alpha}, sigma={sigma}: expected alpha >= 0 and sigma > 0")
    self.geometry = vocab_lib.Geometry(base_vocab_size, offsets)
    self.alpha, self.sigma = float(alpha), float(sigma)
    self.min_count = vocab_lib.check_int("min_count", min_count, 1)
    self.s_prior_count = check_s_prior_count(s_prior_count)
    self.merges = []
    self._exp = None  # decode tables, built on first use
    for k, m in enumerate(merges):
      self.merges.append(self._check_merge(k, m))
    self._sizes = np.concatenate([  # cells per token
        np.ones(self.base_vocab_size, np.int32),
        np.array([len(self.geometry.codes(t)) for t in range(self.base_vocab_size,
                                                               self.vocab_size)], np.int32)])

  def _check_merge(self, k: int, m) -> dict:
    """Registers merge record k (id, a, b, offset; optional stats, footprint); its copy."""
    t = self.geometry.size
    where = f"merge {k} (token {t})"
    if not isinstance(m, dict) or not {"a", "b", "offset"} <= m.keys():
      raise ValueError(f"{where}: {m!r}; expected a dict with keys a, b, offset")
    m = dict(m)
    if m.setdefault("id", t) != t or not vocab_lib.is_int(m["id"]):
      raise ValueError(f"{where}: id={m['id']!r}; expected id {t} (base vocabulary "
                       f"{self.base_vocab_size} plus {k} earlier merges)")
    for key in _MERGE_INTS:
      if key in m:
        vocab_lib.check_int(f"{where} field {key!r}", m[key], 0)
    for key in _MERGE_FLOATS:
      v = m.get(key)
      if v is not None and (not isinstance(v, numbers.Real) or isinstance(v, bool)):
        raise ValueError(f"{where} field {key!r}={v!r}: expected a number (or null)")
    try:
      self.geometry.add(m["a"], m["b"], m["offset"])
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from e
    if "footprint" in m and self.geometry.footprint(t).tolist() != m["footprint"]:
      raise ValueError(f"{where} field 'footprint'={m['footprint']!r} does not match its "
                       f"(a, b, offset): expected {self.geometry.footprint(t).tolist()}")
    m.pop("footprint", None)
    m["id"], m["a"], m["b"], m["offset"] = t, int(m["a"]), int(m["b"]), list(
        self.geometry.merges[-1][2])
    return m

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
            mesh=None, progress: bool = True, return_timing: bool = False,
            s_prior_count: float = 0.0, exchange=None, threads: int = 1):
    """Learns up to `num_merges` merges from int grids [N, H, W] of codes in [0, V).

    int16 grids are used as they are (no int32 copy); other integer dtypes are copied to int32.

    V + num_merges must stay <= MAX_VOCAB_SIZE (2**24); grids must hold at least one grid.
    s_prior_count: pseudo-count k shrinking S towards 0 for rare pairs, S_k = S * N / (N + k)
    (`scoring`); 0 = no correction.
    exchange: several hosts (`bpe.exchange.Exchange`), each calling this with its own shard of
    the grids and the same settings; all get the vocabulary of one host learning from all.
    threads: the grids' work runs on this many threads, each on its own shard of the grids
    (`learner.learn`); the vocabulary does not depend on it.
    """
    s_prior_count = check_s_prior_count(s_prior_count)
    base_vocab_size, num_merges = _check_sizes(base_vocab_size, num_merges)
    grids = check_grids(grids, base_vocab_size, min_grids=1, keep_int16=True)
    _, h, w = grids.shape
    if 2 * (base_vocab_size + num_merges) ** 2 * h * (2 * w - 1) >= 2**63:
      raise ValueError(f"grids of {h}x{w} with a vocabulary of {base_vocab_size + num_merges} "
                       "tokens: pair keys would overflow int64; expected fewer tokens or "
                       "smaller grids")
    if not alpha >= 0 or not sigma > 0:
      raise ValueError(f"alpha={alpha}, sigma={sigma}: expected alpha >= 0 and sigma > 0")
    if int(min_count) < 1:
      raise ValueError(f"min_count={min_count}: expected >= 1")
    offsets = vocab_lib.check_offsets(offsets)
    threads = vocab_lib.check_int("threads", threads, 1)
    _, records, timing = learner.learn(grids, int(base_vocab_size), int(num_merges),
                                       float(alpha), float(sigma), offsets, int(min_count),
                                       mesh=mesh, progress=progress,
                                       s_prior_count=s_prior_count, exchange=exchange,
                                       threads=threads)
    bpe = cls(base_vocab_size, records, offsets, alpha, sigma, min_count, s_prior_count)
    return (bpe, timing) if return_timing else bpe

  def tokenize(self, grids, owners: bool = True) -> grid_state.GridState:
    """Applies every merge, in learned order, to grids [N, H, W]; returns the grid state
    (with each cell's owner unless `owners=False`: anchors only, all that `encode` reads).
    """
    return self._merge_all(check_grids(grids, self.base_vocab_size, keep_int16=True), owners)

  def _merge_all(self, grids: np.ndarray, owners: bool) -> grid_state.GridState:
    """`tokenize` on grids already checked (`encode` checks them once, not per chunk)."""
    state = grid_state.GridState(grids, self.geometry, capacity=self.vocab_size, owners=owners)
    for k, (a, b, delta) in enumerate(self.geometry.merges):
      if state.num_positions(a) and state.num_positions(b):
        p, q = state.find_merge(a, b, delta)
        if p.size:
          state.commit_merge(b, p, q, self.base_vocab_size + k)
    return state

  def encode(self, grids, chunk: int = 0, threads: int = 1, processes: int = 1) -> dict:
    """Tokens of grids [N, H, W] in raster order of their anchors.

    Returns numpy arrays: tokens int32 [N, L] (-1 = padding), positions int32 [N, L, 2] (row,
    col of each anchor), cells int32 [N, L] (footprint sizes), lengths int32 [N], grid_shape
    int32 [2]; L is the longest sequence in the batch.

    Merges never cross grids, so grids are encoded `chunk` at a time (0: as many grids as hold
    `ENCODE_CHUNK_CELLS` cells, fewer if that would leave a worker idle), by `processes` worker
    processes or by `threads` threads; the result depends on none of them. Processes scale
    with cores; threads do not, because numpy keeps the GIL on arrays of fewer than ~500
    elements and most merges touch fewer than that in a chunk (BENCHMARKS.md, "At Being-VL
    scale"). The workers are forked (they inherit the vocabulary and the grids; only their
    tokens come back), so `processes` needs the fork start method (Linux, macOS); they run
    numpy only, never jax (which warns at a fork once its backends have started).
    """
    threads = vocab_lib.check_int("threads", threads, 1)
    processes = vocab_lib.check_int("processes", processes, 1)
    if threads > 1 and processes > 1:
      raise ValueError(f"threads={threads}, processes={processes}: expected one of them > 1, "
                       "not both")
    chunk = vocab_lib.check_int("chunk", chunk, 0)
    grids = check_grids(grids, self.base_vocab_size, keep_int16=True)
    n, h, w = grids.shape
    workers = max(threads, processes)
    chunk = chunk or max(1, min(-(-n // workers), ENCODE_CHUNK_CELLS // (h * w)))
    parts = [grids[i:i + chunk] for i in range(0, n, chunk)] or [grids]
    if processes > 1 and len(parts) > 1:
      if "fork" not in multiprocessing.get_all_start_methods():
        raise ValueError(f"processes={processes}: worker processes are forked, and this "
                         "platform cannot fork; expected processes=1 (or threads=)")
      with concurrent.futures.ProcessPoolExecutor(
          min(processes, len(parts)), mp_context=multiprocessing.get_context("fork"),
          initializer=_set_worker, initargs=(self, grids, chunk)) as pool:
        outs = list(pool.map(_merge_in_worker, range(len(parts))))
    elif threads > 1 and len(parts) > 1:
      with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        outs = list(pool.map(self._merge_chunk, parts))
    else:
      outs = [self._merge_chunk(x) for x in parts]
    return self._assemble(outs, h, w, threads=workers)

  def _merge_chunk(self, grids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One chunk's tokens, compact: lengths [n], then each token and its anchor's index inside
    its grid, in raster order of the anchors ([A] each)."""
    state = self._merge_all(grids, owners=False)
    tok = state.tok.reshape(state.n, state.hw)
    anchor = tok >= 0
    local = np.broadcast_to(
        np.arange(state.hw, dtype=np.int16 if state.hw <= 1 << 15 else np.int32), tok.shape)
    return anchor.sum(1, dtype=np.int32), tok[anchor], local[anchor]

  def _assemble(self, outs, h: int, w: int, threads: int = 1) -> dict:
    """`encode`'s padded arrays from the chunks' `_merge_chunk` outputs, in order; each
    chunk's rows are written by one of `threads` threads. `_empty` maps the arrays without
    the huge-page hint, so their first touch is cheap (outputs 2.5 s for 10^6 grids, against
    11.6 s with numpy's hint: BENCHMARKS.md, "The outputs without huge pages")."""
    lengths = np.concatenate([o[0] for o in outs])
    n, width = lengths.size, int(lengths.max()) if lengths.size else 0
    tokens = _empty((n, width), np.int32)
    positions = _empty((n, width, 2), np.int32)
    cells = _empty((n, width), np.int32)
    first = np.cumsum([0] + [o[0].size for o in outs])

    def fill(i):
      length, tok, local = outs[i]
      rows = slice(first[i], first[i + 1])
      tokens[rows], positions[rows], cells[rows] = -1, 0, 0
      # Row-major order over the [n, L] slots of the valid ones is raster order over the
      # anchors: boolean scatters put each grid's anchors in its first `length` slots.
      slot = np.arange(width, dtype=np.int32)[None] < length[:, None]
      row = local // w
      tokens[rows][slot] = tok
      positions[rows, :, 0][slot] = row  # (a view per component: a stacked copy is slower)
      positions[rows, :, 1][slot] = local - row * w
      cells[rows][slot] = self._sizes[tok]

    if threads > 1 and len(outs) > 1:
      with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(fill, range(len(outs))))
    else:
      for i in range(len(outs)):
        fill(i)
    return dict(tokens=tokens, positions=positions, cells=cells, lengths=lengths,
                grid_shape=np.array([h, w], np.int32))

  def decode(self, encoding: dict) -> np.ndarray:
    """Base-code grids int32 [N, H, W] from `encode`'s output."""
    missing = [k for k in ("tokens", "positions", "lengths", "grid_shape") if k not in encoding]
    if missing:
      raise ValueError(f"encoding lacks {missing}: expected the dict returned by encode")
    arrays = {k: np.asarray(encoding[k]) for k in ("tokens", "positions", "lengths",
                                                   "grid_shape")}
    for k, v in arrays.items():
      if v.dtype == bool or not np.issubdtype(v.dtype, np.integer):
        raise ValueError(f"encoding[{k!r}] has dtype {v.dtype}: expected integers (int32)")
    tokens, positions, lengths = arrays["tokens"], arrays["positions"], arrays["lengths"]
    grid_shape = arrays["grid_shape"]
    if grid_shape.shape != (2,) or grid_shape.min() < 1:
      raise ValueError(f"encoding['grid_shape']={grid_shape.tolist()}: expected [H, W] >= 1")
    h, w = (int(v) for v in grid_shape)
    if tokens.ndim != 2:
      raise ValueError(f"encoding['tokens'] has shape {tokens.shape}: expected [N, L]")
    n, width = tokens.shape
    if positions.shape != (n, width, 2) or lengths.shape != (n,):
      raise ValueError(f"encoding shapes tokens {tokens.shape}, positions {positions.shape}, "
                       f"lengths {lengths.shape}: expected [N, L], [N, L, 2], [N]")
    if lengths.size and (lengths.min() < 0 or lengths.max() > width):
      raise ValueError(f"encoding['lengths'] in [{lengths.min()}, {lengths.max()}]: expected "
                       f"lengths in [0, {width}] (L = {width})")
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
                alpha=self.alpha, sigma=self.sigma, min_count=self.min_count,
                s_prior_count=self.s_prior_count, merges=merges)

  def save(self, path: str):
    """Writes a readable JSON vocabulary (one merge per line), atomically (`fileio`)."""
    d = self.to_dict()
    merges = d.pop("merges")
    head = fileio.dumps_json(d)[:-1]
    body = ",\n".join("  " + fileio.dumps_json(m) for m in merges)
    fileio.write_text(path, f'{head}, "merges": [\n{body}\n]}}\n')

  @classmethod
  def load(cls, path: str) -> "VisualBPE":
    """Reads `save`'s JSON; a torn, edited or foreign file raises ValueError naming the file
    and the bad field (every id, offset and footprint is checked). Files written before
    `s_prior_count` existed load with s_prior_count = 0 (how they were learned)."""
    d = fileio.read_json(path, what="visual BPE vocabulary")
    where = f"visual BPE vocabulary {path}"
    if not isinstance(d, dict):
      raise ValueError(f"{where}: a JSON {type(d).__name__}; expected an object with "
                       f"format {FORMAT!r}")
    if d.get("format") != FORMAT:
      raise ValueError(f"{where}: format {d.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in ("base_vocab_size", "offsets", "alpha", "sigma", "min_count",
                           "merges") if k not in d]
    if missing:
      raise ValueError(f"{where}: missing field(s) {missing}")
    if d.get("version", 1) != 1:
      raise ValueError(f"{where}: version {d['version']!r}; expected 1")
    try:
      bpe = cls(d["base_vocab_size"], d["merges"], d["offsets"], d["alpha"], d["sigma"],
                d["min_count"], d.get("s_prior_count", 0.0))
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from e
    if d.get("vocab_size", bpe.vocab_size) != bpe.vocab_size:
      raise ValueError(f"{where}: field 'vocab_size'={d['vocab_size']!r}; expected base + "
                       f"merges = {bpe.vocab_size}")
    return bpe
