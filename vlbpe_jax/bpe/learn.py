"""Learn a visual BPE from a .npy of int codes [N, H, W] and write its JSON vocabulary.

  python -m vlbpe_jax.bpe.learn --codes=codes.npy --merges=512 --alpha=1.0 --sigma=0.5 \
      --out=bpe.json [--base_vocab_size=V] [--offsets=0,1;1,0] [--s_prior_count=0] \
      [--devices=8] [--threads=0]

Prints tqdm progress, then one JSON line: merges, seconds (set-up, merges), merges per second.
`--threads` splits the grid work over threads (default: one per CPU this process may use, at
most one per 2**22 cells, `learner.default_threads`); the vocabulary does not depend on it.

Several hosts: run the same command on every host with `VLBPE_DISTRIBUTED=1` (the launchers
set it; `parallel.initialize_distributed`). Each host learns from its contiguous 1/P of the
grids, the pair counts are summed over hosts every merge (`bpe.exchange`), and process 0 writes
the vocabulary: the one a single host learns from all the grids, bit for bit.
Bad input (a torn or empty .npy, negative codes, codes >= 2**24) ends in one `error:` line
naming the file, exit code 2.
"""

import argparse
import json

import numpy as np

from vlbpe_jax import cli
from vlbpe_jax import config_utils
from vlbpe_jax import fileio
from vlbpe_jax.bpe import exchange as exchange_lib
from vlbpe_jax.bpe import learner
from vlbpe_jax.bpe import model
from vlbpe_jax.bpe import vocab as vocab_lib


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--codes", required=True, help=".npy of int codes [N, H, W]")
  ap.add_argument("--out", required=True, help="output JSON vocabulary")
  ap.add_argument("--merges", type=int, required=True)
  ap.add_argument("--alpha", type=float, default=1.0)
  ap.add_argument("--sigma", type=float, default=0.5)
  ap.add_argument("--offsets", default="0,1;1,0", help="cell window, 'dy,dx;dy,dx'")
  ap.add_argument("--min_count", type=int, default=2)
  ap.add_argument("--s_prior_count", type=float, default=0.0,
                  help="pseudo-count k: S_k = S * N / (N + k) for a pair seen N times (0: off)")
  ap.add_argument("--base_vocab_size", type=int, default=0, help="V (default: max code + 1)")
  ap.add_argument("--devices", type=int, default=0,
                  help="shard first counts over this many devices (0: no mesh)")
  ap.add_argument("--threads", type=int, default=0,
                  help="threads for the grid work (0: learner.default_threads)")
  ap.add_argument("--no_progress", action="store_true")
  args = ap.parse_args(argv)
  if args.threads < 0:
    raise ValueError(f"--threads={args.threads}: expected >= 0 (0: learner.default_threads)")
  exchange, processes, primary = None, 1, True
  # The learner is numpy: jax (~130 MB resident) is imported only for a mesh or several hosts.
  if args.devices or config_utils.distributed_requested():
    import jax  # pylint: disable=g-import-not-at-top
    from vlbpe_jax import parallel  # pylint: disable=g-import-not-at-top
    parallel.initialize_distributed()
    processes, primary = jax.process_count(), parallel.is_primary()
  if processes > 1:
    if args.devices:
      raise ValueError(f"--devices={args.devices} with {processes} processes: "
                       "expected --devices=0 (several hosts count on their CPUs)")
    exchange = exchange_lib.Exchange.from_jax()
  codes = fileio.load_npy(args.codes, what="codes")
  name = f"codes {args.codes}"
  if args.base_vocab_size:
    codes = model.check_grids(codes, args.base_vocab_size, name, min_grids=1)
  base = args.base_vocab_size or model.infer_vocab_size(codes, name)
  if exchange is not None:  # every host checked all codes and inferred the same base
    codes = codes[exchange.shard(codes.shape[0])]
    if not codes.shape[0]:
      raise ValueError(f"{name}: {exchange.num_processes} hosts for fewer grids; expected at "
                       "least one grid per host")
  threads = args.threads or learner.default_threads(codes.size)
  if base + args.merges <= np.iinfo(np.int16).max:  # every code fits: hold half the bytes
    codes = codes.astype(np.int16)
  mesh = None
  if args.devices:
    mesh = parallel.make_mesh([("data", -1)], jax.devices()[:args.devices])
  bpe, timing = model.VisualBPE.learn(
      codes, base_vocab_size=base, num_merges=args.merges, alpha=args.alpha, sigma=args.sigma,
      offsets=vocab_lib.parse_offsets(args.offsets), min_count=args.min_count, mesh=mesh,
      progress=not args.no_progress, return_timing=True, s_prior_count=args.s_prior_count,
      exchange=exchange, threads=threads)
  if primary:
    bpe.save(args.out)
  done = len(bpe.merges)
  result = dict(merges=done, out=args.out, setup_s=round(timing["setup_s"], 3),
                merge_s=round(timing["merge_s"], 3), total_s=round(timing["total_s"], 3),
                merges_per_s=round(done / max(timing["merge_s"], 1e-9), 2),
                processes=processes, threads=threads)
  if exchange is not None:
    result["exchange_s"] = round(timing["exchange_s"], 3)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  cli.run_plain(main)
