"""Where the learner's memory goes: array sizes at a few merges of a real run.

  .venv/bin/python benchmarks/bpe_memory_probe.py --codes=codes.npy --merges=8192

Learns with alpha=1, sigma=1, the 4-connected window and V = max code + 1, and after merges
0, 100, 1000, 4000 and the last prints the peak RSS so far, the per-cell arrays of the grid
state (tokens, owners, base-code index, scratch flags), the position lists and the pair tables
(`_Counts`), with the numbers of stored triples and pairs. It wraps `_Counts.apply` and
`GridState.__init__` to see them (a probe, not an API).
"""

import argparse
import resource

import numpy as np

from vlbpe_jax.bpe import grid_state
from vlbpe_jax.bpe import learner


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--codes", required=True)
  ap.add_argument("--merges", type=int, default=8192)
  args = ap.parse_args()
  grids = np.load(args.codes)
  states, calls = [], [0]
  gs_init, apply = grid_state.GridState.__init__, learner._Counts.apply  # pylint: disable=protected-access

  def init_and_keep(self, *a, **k):
    gs_init(self, *a, **k)
    states.append(self)

  def apply_and_report(self, uk, dv):
    apply(self, uk, dv)
    k, calls[0] = calls[0], calls[0] + 1
    if k not in (0, 100, 1000, 4000, args.merges - 1):
      return
    st = states[-1]
    cells = sum(getattr(st, a).nbytes for a in ("tok", "own", "scratch", "_base_order"))
    # Merged tokens' lists (base codes narrow their slice of `_base_order` in place).
    pos = sum(v.nbytes for v in st._pos.values())  # pylint: disable=protected-access
    tabs = sum(getattr(self, a).nbytes for a in ("tcnt", "tpair", "tstart", "tlen", "acnt",
                                                 "s", "pair_keys", "in_pool", "td"))
    tabs += self.triples._sorted.nbytes + self.triples._slots.nbytes  # pylint: disable=protected-access
    print(f"merge {k}: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
          f" MB; cells {cells / 1e6:.0f} MB; positions {pos / 1e6:.0f} MB; tables "
          f"{tabs / 1e6:.0f} MB ({self.triples.size} triples, {self.npairs} pairs)", flush=True)

  grid_state.GridState.__init__ = init_and_keep
  learner._Counts.apply = apply_and_report  # pylint: disable=protected-access
  _, _, timing = learner.learn(grids, int(grids.max()) + 1, args.merges, 1.0, 1.0,
                               ((0, 1), (1, 0)), 2)
  print(timing)


if __name__ == "__main__":
  main()
