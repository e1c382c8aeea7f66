"""Decodes int32 codes [N, h, w] into PNG files OUT/00000.png ... in the same order.

  python -m vlbpe_jax.vq.decode --workdir=$W --codes=codes.npy --outdir=OUT

A torn file, codes of the wrong rank, dtype or grid (the tokenizer's h x w), or outside
[0, codebook_size) raise a ValueError naming the file before decoding (the file is checked
before the checkpoint is restored); the CLI prints it as one `error:` line, exit code 2.
"""

import os

from absl import app
from absl import flags
from PIL import Image

from vlbpe_jax import cli
from vlbpe_jax import fileio
from vlbpe_jax.vq import tokenizer


def decode_file(workdir: str, codes_path: str, outdir: str, batch_size: int = 64) -> int:
  if not os.path.exists(codes_path):
    raise ValueError(f"codes={codes_path!r}: no such file")
  codes = fileio.load_npy(codes_path, what="codes")
  try:
    codes = tokenizer.check_codes(codes)  # rank, dtype, sign: before the (slow) restore
    tok = tokenizer.Tokenizer.from_workdir(workdir, batch_size=batch_size)
    codes = tok.check_codes(codes)
  except ValueError as e:
    raise ValueError(f"codes={codes_path!r}: {e}") from e
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
  cli.run(main)
