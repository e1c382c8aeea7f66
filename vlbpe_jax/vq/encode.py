"""Encodes a directory of images (the shapes CLI layout) into int32 codes [N, h, w].

  python -m vlbpe_jax.vq.encode --workdir=$W --data=DIR --out=codes.npy

Images are `DIR/scenes.jsonl`'s "image" entries in file order when that file exists, else the
sorted `DIR/images/*.png`. Each must be RGB at the tokenizer's training resolution.
"""

import json
import os

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from vlbpe_jax.vq import tokenizer


def image_paths(data_dir: str) -> list[str]:
  """The image files of `data_dir` in dataset order."""
  jsonl = os.path.join(data_dir, "scenes.jsonl")
  if os.path.exists(jsonl):
    with open(jsonl) as f:
      return [os.path.join(data_dir, json.loads(line)["image"]) for line in f if line.strip()]
  img_dir = os.path.join(data_dir, "images")
  if not os.path.isdir(img_dir):
    raise ValueError(f"data={data_dir!r}: expected {img_dir}/ (and optionally scenes.jsonl)")
  return [os.path.join(img_dir, n) for n in sorted(os.listdir(img_dir))
          if n.lower().endswith(".png")]


def read_images(paths: list[str], resolution: int) -> np.ndarray:
  """PNG files -> uint8 [N, R, R, 3]; a wrong size or channel count raises naming the file."""
  out = np.empty((len(paths), resolution, resolution, 3), np.uint8)
  for i, path in enumerate(paths):
    with Image.open(path) as im:
      if im.mode != "RGB":
        raise ValueError(f"image {path}: mode {im.mode} ({len(im.getbands())} channels); "
                         "expected RGB with 3 channels")
      if im.size != (resolution, resolution):
        raise ValueError(f"image {path}: size {im.size[0]}x{im.size[1]}; expected "
                         f"{resolution}x{resolution} (the tokenizer's resolution)")
      out[i] = np.asarray(im)
  return out


def encode_dir(workdir: str, data_dir: str, out: str, batch_size: int = 64) -> np.ndarray:
  tok = tokenizer.Tokenizer.from_workdir(workdir, batch_size=batch_size)
  paths = image_paths(data_dir)
  if not paths:
    raise ValueError(f"data={data_dir!r}: no images found")
  codes = tok.encode(read_images(paths, tok.resolution))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.save(out, codes)
  return codes


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  fv = flags.FLAGS
  codes = encode_dir(fv.workdir, fv.data, fv.out, fv.batch_size)
  print(f"{fv.out}: int32 {list(codes.shape)}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Run directory holding vq/ckpt.")
  flags.DEFINE_string("data", None, "Directory with images/ (+ scenes.jsonl).")
  flags.DEFINE_string("out", None, "Output .npy file (int32 [N, h, w]).")
  flags.DEFINE_integer("batch_size", 64, "Images per device batch.")
  flags.mark_flags_as_required(["workdir", "data", "out"])
  app.run(main)
