"""Decodes int32 codes [N, h, w] into PNG files OUT/00000.png ... in the same order.

  python -m vlbpe_jax.vq.decode --workdir=$W --codes=codes.npy --outdir=OUT

Codes outside [0, codebook_size) or of the wrong rank raise a ValueError before decoding.
"""

import os

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from vlbpe_jax.vq import tokenizer


def decode_file(workdir: str, codes_path: str, outdir: str, batch_size: int = 64) -> int:
  if not os.path.exists(codes_path):
    raise ValueError(f"codes={codes_path!r}: no such file")
  codes = np.load(codes_path)
  tok = tokenizer.Tokenizer.from_workdir(workdir, batch_size=batch_size)
  images = tok.decode(codes)
  os.makedirs(outdir, exist_ok=True)
  for i, im in enumerate(images):
    Image.fromarray(im).save(os.path.join(outdir, f"{i:05d}.png"))
  return len(images)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  fv = flags.FLAGS
  n = decode_file(fv.workdir, fv.codes, fv.outdir, fv.batch_size)
  print(f"{fv.outdir}: {n} images")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Run directory holding vq/ckpt.")
  flags.DEFINE_string("codes", None, "Input .npy file of codes [N, h, w].")
  flags.DEFINE_string("outdir", None, "Directory for the PNG files.")
  flags.DEFINE_integer("batch_size", 64, "Code grids per device batch.")
  flags.mark_flags_as_required(["workdir", "codes", "outdir"])
  app.run(main)
