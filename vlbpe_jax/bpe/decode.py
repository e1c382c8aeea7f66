"""Decode a tokens .npz (from `vlbpe_jax.bpe.encode`) back to int codes [N, H, W] (.npy).

  python -m vlbpe_jax.bpe.decode --bpe=bpe.json --tokens=tokens.npz --out=codes.npy

Tokens that carry a `bpe_digest` (from `encode` or the pipeline's bpe stage) must come from this
very vocabulary file: a mismatch is refused, since another vocabulary decodes to wrong codes.
"""

import argparse
import json

from vlbpe_jax import cli
from vlbpe_jax import fileio
from vlbpe_jax.bpe import model


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--bpe", required=True)
  ap.add_argument("--tokens", required=True)
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  bpe = model.VisualBPE.load(args.bpe)
  enc = fileio.load_npz(args.tokens, what="tokens")
  if "bpe_digest" in enc:
    want, have = str(enc["bpe_digest"]), fileio.short_digest(args.bpe)
    if want != have:
      raise ValueError(f"tokens {args.tokens} were encoded with a vocabulary of digest {want}, "
                       f"but {args.bpe} has digest {have}: expected the bpe.json they were "
                       "encoded with (another vocabulary decodes to wrong codes)")
  try:
    codes = bpe.decode(enc)
  except ValueError as e:
    raise ValueError(f"tokens {args.tokens}: {e}") from e
  fileio.save_npy(args.out, codes)
  result = dict(images=int(codes.shape[0]), shape=list(codes.shape), out=args.out)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  cli.run_plain(main)
