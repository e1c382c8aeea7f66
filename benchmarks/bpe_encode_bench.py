"""Encoding throughput of a learned visual BPE on a .npy of grids, in grids/s and per CPU-s.

  .venv/bin/python benchmarks/bpe_encode_bench.py --bpe=bpe.json --codes=codes.npy \
      --runs='0,1;0,2'

Each run is `chunk,threads` of `VisualBPE.encode` (chunk 0: N / threads); prints one line per
run: grids/s wall, grids per process CPU-second (all threads; steadier than wall on a shared
machine), the token count (equal across runs), then the peak RSS.
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
  ap.add_argument("--runs", default="0,1", help="'chunk,threads;...'")
  args = ap.parse_args()
  bpe = model.VisualBPE.load(args.bpe)
  g = np.load(args.codes)
  chunked = "threads" in inspect.signature(bpe.encode).parameters  # older commits: one batch
  for run in args.runs.split(";"):
    chunk, threads = (int(v) for v in run.split(","))
    t, c = time.perf_counter(), time.process_time()
    enc = bpe.encode(g, chunk=chunk, threads=threads) if chunked else bpe.encode(g)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    print(f"chunk {chunk} threads {threads}: {g.shape[0] / wall:.0f} grids/s wall, "
          f"{g.shape[0] / cpu:.0f} grids/CPU-s, tokens {int(enc['lengths'].sum())}", flush=True)
  print(f"peak RSS MB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


if __name__ == "__main__":
  main()
