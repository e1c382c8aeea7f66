"""Encoding throughput of a learned visual BPE on a .npy of grids, in grids/s and per CPU-s.

  .venv/bin/python benchmarks/bpe_encode_bench.py --bpe=bpe.json --codes=codes.npy \
      --runs='0,1;0,1,2'

Each run is `chunk,threads[,processes]` of `VisualBPE.encode` (chunk 0: its default); prints
one line per run: grids/s wall, grids per CPU-second of this process and its finished worker
processes (all threads; steadier than wall on a shared machine), the token count (equal across
runs), then the peak RSS (of this process; `ru_maxrss` of the workers is printed beside it).
"""

import argparse
import inspect
import resource
import time

import numpy as np

from vlbpe_jax.bpe import model


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--bpe", required=True)
  ap.add_argument("--codes", required=True)
  ap.add_argument("--runs", default="0,1", help="'chunk,threads[,processes];...'")
  args = ap.parse_args()
  bpe = model.VisualBPE.load(args.bpe)
  g = np.load(args.codes)
  params = inspect.signature(bpe.encode).parameters  # older commits: one batch, no processes

  def cpu_seconds():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

  for run in args.runs.split(";"):
    chunk, threads, processes = ([int(v) for v in run.split(",")] + [1])[:3]
    kw = dict(chunk=chunk, threads=threads) if "threads" in params else {}
    if processes > 1:
      kw["processes"] = processes
    t, c = time.perf_counter(), cpu_seconds()
    enc = bpe.encode(g, **kw)
    wall, cpu = time.perf_counter() - t, cpu_seconds() - c
    print(f"chunk {chunk} threads {threads} processes {processes}: {g.shape[0] / wall:.0f} "
          f"grids/s wall, {g.shape[0] / cpu:.0f} grids/CPU-s, tokens "
          f"{int(enc['lengths'].sum())}", flush=True)
  print(f"peak RSS MB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}, "
        f"workers' MB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f}")


if __name__ == "__main__":
  main()
