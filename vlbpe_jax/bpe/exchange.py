"""Summing sparse integer counts over hosts: the visual BPE learner on several processes.

Each host holds its own grids (a shard of the corpus). The learner's pair counts are sums over
hosts of exact integers, so every host can hold the same global counts and pick the same merge:
per merge each host turns its grid changes into (key, delta) runs, `Exchange.sum_runs` gathers
every host's runs and sums them per key, and every host applies the same sums. Integer sums do
not depend on the order of hosts, so the vocabulary is bit-identical to one host's learning
from all the grids (tests/test_bpe_exchange.py in threads, tests/test_multiprocess.py across
`jax.distributed` processes).

`allgather(x)` is the one collective: an int32 array of the same shape on every host ->
stacked `[num_processes, ...]`. `process_allgather` (jax.experimental.multihost_utils) is the
default; tests pass a thread-barrier one. Sizes vary per merge: each `sum_runs` sends a header
(sizes) and up to a bucket of rows in one collective, and the rows past it, if any host has
more, in a second; the bucket (a power of two, so few shapes compile) is twice the last
largest size, rounded up.
A collective costs ~2 ms on CPU (gloo), so one per merge is what matters (BENCHMARKS.md).
"""

import threading
import time

import numpy as np

from vlbpe_jax.bpe import tables

_MIN_BUCKET = 256


def _process_allgather(x: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


class Exchange:
  """Sums of (key, value) runs and of a few integers over `num_processes` hosts."""

  def __init__(self, num_processes: int, process_index: int, allgather=None):
    if num_processes < 1 or not 0 <= process_index < num_processes:
      raise ValueError(f"process {process_index} of {num_processes}: expected "
                       "0 <= process_index < num_processes")
    self.num_processes, self.process_index = num_processes, process_index
    self._allgather = allgather or _process_allgather
    self.calls = 0  # collectives issued (one per `sum_runs`, two when its sizes outgrow the
    #                 bucket)
    self._bucket = _MIN_BUCKET  # rows sent in the first collective of `sum_runs`
    self.seconds = 0.0  # wall seconds in `sum_runs` (waiting for the others included)

  @classmethod
  def from_jax(cls) -> "Exchange":
    """The exchange of this `jax.distributed` run (one process: sums are local)."""
    import jax  # pylint: disable=g-import-not-at-top
    return cls(jax.process_count(), jax.process_index())

  def shard(self, n: int) -> slice:
    """This host's contiguous rows of `n` (the first `n % P` hosts get one more)."""
    q, r = divmod(n, self.num_processes)
    lo = self.process_index * q + min(self.process_index, r)
    return slice(lo, lo + q + (self.process_index < r))

  def sum_ints(self, values) -> list[int]:
    """Sums over hosts of a few Python ints (each |sum| < 2**31)."""
    _, _, out = self.sum_runs(np.zeros(0, np.int64), np.zeros(0, np.int64), values)
    return out

  def sum_runs(self, keys: np.ndarray, values: np.ndarray, extra=()):
    """Gathers every host's (keys int64, values |v| < 2**31) and sums values per key.

    Returns (unique sorted keys, int64 sums, [sums of the ints in `extra`]); the same on every
    host. Keys may repeat within a host.
    """
    keys = np.ascontiguousarray(keys, np.int64)
    values = np.asarray(values)
    if keys.shape != values.shape or keys.ndim != 1:
      raise ValueError(f"keys {keys.shape} and values {values.shape}: expected equal 1-D shapes")
    if values.size and (values.max() >= 2**31 or values.min() < -2**31):
      raise ValueError("values outside int32: expected per-host counts below 2**31")
    head = np.array([keys.size, *extra], np.int64)
    if len(extra) > 2 or np.abs(head).max() >= 2**31:
      raise ValueError(f"sizes/extra {head.tolist()}: expected at most 2 extras, each below "
                       "2**31")
    if self.num_processes == 1:
      k, v = tables.sum_by_key(keys, values)
      return k, v, [int(e) for e in extra]
    t0 = time.perf_counter()
    rows = np.zeros((keys.size, 3), np.int32)
    rows[:, :2] = keys.view(np.int32).reshape(-1, 2)  # int64 bits, no x64 needed
    rows[:, 2] = values
    # One collective: a header row (size, extras) and the first `bucket` rows; rows past the
    # bucket (every host sees all sizes) go in a second one. The bucket follows the sizes.
    b = self._bucket
    buf = np.zeros((b + 1, 3), np.int32)
    buf[0, :head.size] = head
    buf[1:1 + min(keys.size, b)] = rows[:b]
    got = self._allgather(buf)  # [P, b + 1, 3]
    sizes = got[:, 0, 0].astype(np.int64)
    parts = [got[p, 1:1 + min(n, b)] for p, n in enumerate(sizes)]
    self.calls += 1
    if sizes.max() > b:
      more = 1 << int(sizes.max() - b - 1).bit_length()
      buf = np.zeros((more, 3), np.int32)
      buf[:max(keys.size - b, 0)] = rows[b:]
      extra_rows = self._allgather(buf)
      parts = [np.concatenate([part, extra_rows[p, :max(n - b, 0)]])
               for p, (part, n) in enumerate(zip(parts, sizes))]
      self.calls += 1
    self._bucket = max(_MIN_BUCKET, 1 << int(2 * sizes.max() - 1).bit_length())  # 2x room
    allrows = np.concatenate(parts)
    k = np.ascontiguousarray(allrows[:, :2]).view(np.int64).ravel()
    k, v = tables.sum_by_key(k, allrows[:, 2])
    self.seconds += time.perf_counter() - t0
    return k, v, [int(x) for x in got[:, 0, 1:1 + len(extra)].astype(np.int64).sum(0)]


class ThreadGroup:
  """`num_processes` hosts simulated by threads in one process: `exchange(i)` is host i's
  Exchange, its allgather a barrier over the threads (for tests and notebooks)."""

  def __init__(self, num_processes: int):
    self.num_processes = num_processes
    self._slots = [None] * num_processes
    self._barrier = threading.Barrier(num_processes)

  def exchange(self, i: int) -> Exchange:
    def allgather(x):
      self._slots[i] = np.array(x)
      self._barrier.wait()
      out = np.stack(self._slots)
      self._barrier.wait()  # nobody overwrites its slot before all have read
      return out
    return Exchange(self.num_processes, i, allgather)
