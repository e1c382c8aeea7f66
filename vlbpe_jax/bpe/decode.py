"""Decode a tokens .npz (from `vlbpe_jax.bpe.encode`) back to int codes [N, H, W] (.npy).

  python -m vlbpe_jax.bpe.decode --bpe=bpe.json --tokens=tokens.npz --out=codes.npy
"""

import argparse
import json

import numpy as np

from vlbpe_jax.bpe import model


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--bpe", required=True)
  ap.add_argument("--tokens", required=True)
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  bpe = model.VisualBPE.load(args.bpe)
  with np.load(args.tokens) as f:
    enc = {k: f[k] for k in f.files}
  codes = bpe.decode(enc)
  np.save(args.out, codes)
  result = dict(images=int(codes.shape[0]), shape=list(codes.shape), out=args.out)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
