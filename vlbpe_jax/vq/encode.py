"""Encodes a directory of images (the shapes CLI layout) into int32 codes [N, h, w].

  python -m vlbpe_jax.vq.encode --workdir=$W --data=DIR --out=codes.npy

Images are `DIR/scenes.jsonl`'s "image" entries in file order when that file exists, else the
sorted `DIR/images/*.png`. Each must be RGB at the tokenizer's training resolution. Every image
is read before the checkpoint is restored: a missing, truncated or non-PNG file, a wrong mode or
size fails fast with one `error:` line naming it (exit code 2).
"""

import json
import os

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from vlbpe_jax import cli
from vlbpe_jax import fileio
from vlbpe_jax.vq import tokenizer


def image_paths(data_dir: str) -> list[str]:
  """The image files of `data_dir` in dataset order."""
  jsonl = os.path.join(data_dir, "scenes.jsonl")
  if os.path.exists(jsonl):
    paths = []
    with open(jsonl, "rb") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          paths.append(os.path.join(data_dir, json.loads(line)["image"]))
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
          raise fileio.CorruptArtifactError(
              f"{jsonl}:{lineno}: expected a JSON object with an \"image\" path ({e!r})") from e
    return paths
  img_dir = os.path.join(data_dir, "images")
  if not os.path.isdir(img_dir):
    raise ValueError(f"data={data_dir!r}: expected {img_dir}/ (and optionally scenes.jsonl)")
  return [os.path.join(img_dir, n) for n in sorted(os.listdir(img_dir))
          if n.lower().endswith(".png")]


def read_images(paths: list[str], resolution=None) -> np.ndarray:
  """PNG files -> uint8 [N, R, R, 3]; an unreadable (truncated, not an image) file, a wrong
  size or channel count raises ValueError naming the file. resolution=None: the first
  image's size, which must be square."""
  out = None
  for i, path in enumerate(paths):
    try:
      with Image.open(path) as im:
        im.load()  # decodes the pixels here: a truncated file fails now
        mode, size, channels = im.mode, im.size, len(im.getbands())
        pixels = np.asarray(im)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"image {path}: no such file") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL: truncated / unidentified image
      raise ValueError(f"image {path} cannot be read as an image ({e}): expected a PNG file; "
                       "it is truncated or not an image") from e
    if mode != "RGB":
      raise ValueError(f"image {path}: mode {mode} ({channels} channels); "
                       "expected RGB with 3 channels")
    why = "the tokenizer's resolution"
    if resolution is None:
      resolution, why = size[0], f"the size of the first image, {path}"
    if size != (resolution, resolution):
      raise ValueError(f"image {path}: size {size[0]}x{size[1]}; expected "
                       f"{resolution}x{resolution} ({why})")
    if out is None:
      out = np.empty((len(paths), resolution, resolution, 3), np.uint8)
    out[i] = pixels
  return out if out is not None else np.zeros((0, resolution or 0, resolution or 0, 3),
                                              np.uint8)


def encode_dir(workdir: str, data_dir: str, out: str, batch_size: int = 64) -> np.ndarray:
  paths = image_paths(data_dir)
  if not paths:
    raise ValueError(f"data={data_dir!r}: no images found")
  images = read_images(paths)  # every file checked before the (slow) restore
  tok = tokenizer.Tokenizer.from_workdir(workdir, batch_size=batch_size)
  if images.shape[1] != tok.resolution:
    raise ValueError(f"data={data_dir!r}: images of {images.shape[1]}x{images.shape[2]} "
                     f"(e.g. {paths[0]}); expected {tok.resolution}x{tok.resolution}, the "
                     "tokenizer's resolution")
  codes = tok.encode(images)
  fileio.save_npy(out, codes)
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
  cli.run(main)
