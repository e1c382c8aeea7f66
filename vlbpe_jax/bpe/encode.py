"""Encode int codes [N, H, W] (.npy) with a learned visual BPE into a tokens .npz.

  python -m vlbpe_jax.bpe.encode --bpe=bpe.json --codes=codes.npy --out=tokens.npz \
      [--processes=8]

The .npz holds tokens [N, L] (-1 padding), positions [N, L, 2], cells [N, L], lengths [N],
grid_shape [2] (see `VisualBPE.encode`) and bpe_digest (the first 16 hex digits of the
vocabulary file's sha256, as the pipeline's bpe stage writes it; `decode` checks it). Prints one
JSON line with the compression.
"""

import argparse
import json
import time

import numpy as np

from vlbpe_jax import cli
from vlbpe_jax import fileio
from vlbpe_jax.bpe import model


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--bpe", required=True)
  ap.add_argument("--codes", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--processes", type=int, default=1,
                  help="forked worker processes, each encoding chunks of the grids (scales with "
                       "cores)")
  ap.add_argument("--threads", type=int, default=1,
                  help="threads instead (numpy's GIL on small arrays limits their gain)")
  ap.add_argument("--chunk", type=int, default=0,
                  help="grids per chunk (0: model.ENCODE_CHUNK_CELLS cells' worth)")
  args = ap.parse_args(argv)
  bpe = model.VisualBPE.load(args.bpe)
  codes = model.check_grids(fileio.load_npy(args.codes, what="codes"), bpe.base_vocab_size,
                            f"codes {args.codes}", keep_int16=True)
  t = time.perf_counter()
  enc = bpe.encode(codes, chunk=args.chunk, threads=args.threads, processes=args.processes)
  seconds = time.perf_counter() - t
  digest = fileio.short_digest(args.bpe)
  fileio.save_npz(args.out, bpe_digest=np.array(digest), **enc)
  result = dict(images=int(codes.shape[0]), out=args.out, seconds=round(seconds, 3),
                grids_per_s=round(codes.shape[0] / max(seconds, 1e-9), 1),
                cells_per_token=round(codes.size / max(int(enc["lengths"].sum()), 1), 4))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  cli.run_plain(main)
