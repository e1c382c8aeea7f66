"""A trained VQ as a tokenizer: uint8 images <-> int32 code grids, with host-side checks.

  tok = Tokenizer.from_workdir(workdir)          # restores workdir/vq/ckpt (latest step)
  codes = tok.encode(images)                     # uint8 [N, R, R, 3] -> int32 [N, R/f, R/f]
  images = tok.decode(codes)                     # int32 [N, h, w] -> uint8 [N, h*f, w*f, 3]

Both run the jitted `VQModel.encode` / `VQModel.decode` (the training path's two halves) in
batches sharded over the mesh's batch axes.
"""

import os

import ml_collections
import numpy as np

from vlbpe_jax import checkpoint
from vlbpe_jax import parallel
from vlbpe_jax.vq import train


def check_codes(codes, grid=None, codebook_size=None) -> np.ndarray:
  """Code grids as int32 [N, h, w] or ValueError naming the bad shape, dtype or value.

  grid: the (h, w) the tokenizer was trained for (None: any); codebook_size: codes must lie in
  [0, codebook_size) (None: only >= 0).
  """
  codes = np.asarray(codes)
  if codes.ndim != 3:
    raise ValueError(f"codes of shape {codes.shape}: expected [N, h, w]")
  if codes.dtype == bool or not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"codes of dtype {codes.dtype}: expected integers (int32)")
  if grid is not None and codes.shape[1:] != tuple(grid):
    raise ValueError(f"codes of shape {codes.shape} (grid {codes.shape[1]}x{codes.shape[2]}): "
                     f"expected [N, {grid[0]}, {grid[1]}], the {grid[0]}x{grid[1]} grid this "
                     "tokenizer was trained for")
  bad = (codes < 0) if codebook_size is None else (codes < 0) | (codes >= codebook_size)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    want = "codes >= 0" if codebook_size is None else f"codes in [0, {codebook_size})"
    raise ValueError(f"codes hold {int(bad.sum())} values outside [0, {codebook_size or 'inf'}) "
                     f"(first at index {first}: {int(codes[first])}); expected {want}")
  return codes.astype(np.int32)


class Tokenizer:
  """Holds a config, its parameters and the jitted encode/decode functions."""

  def __init__(self, config, params, mesh=None, batch_size: int = 64):
    self.config = config
    self.trainer = train.Trainer(config, mesh)
    self.params = params
    self.batch_size = batch_size
    self.codebook_size = int(config.vq.codebook_size)
    self.resolution = int(config.data.resolution)
    self.downsample = train.make_model(config.vq).downsample
    self.grid = (self.resolution // self.downsample,) * 2

  @classmethod
  def from_workdir(cls, workdir: str, step=None, mesh=None, batch_size: int = 64):
    """Restores the parameters saved by `vq.train` under `workdir/vq/ckpt`."""
    ckpt_dir = os.path.join(workdir, "vq", "ckpt")
    if not os.path.isdir(ckpt_dir):
      raise ValueError(f"workdir={workdir!r}: no VQ checkpoint directory {ckpt_dir}; "
                       "train one with `python -m vlbpe_jax.vq.train`")
    with checkpoint.Checkpointer(ckpt_dir, async_save=False) as ckpt:
      if ckpt.latest_step() is None:
        raise ValueError(f"workdir={workdir!r}: {ckpt_dir} holds no checkpoint")
      config = ml_collections.ConfigDict(ckpt.saved_config(step))
      tok = cls(config, None, mesh, batch_size)
      tok.params = ckpt.restore(tok.trainer.abstract_state, step=step)["params"]
    return tok

  def check_images(self, images) -> np.ndarray:
    images = np.asarray(images)
    want = (self.resolution, self.resolution, 3)
    if images.ndim != 4 or images.shape[1:] != want:
      raise ValueError(f"images of shape {images.shape}: expected [N, {want[0]}, {want[1]}, 3] "
                       f"(RGB at the tokenizer's resolution {self.resolution})")
    if images.dtype != np.uint8:
      raise ValueError(f"images of dtype {images.dtype}: expected uint8 in [0, 255]")
    return images

  def check_codes(self, codes) -> np.ndarray:
    """int32 [N, h, w] on this tokenizer's grid with codes in [0, codebook_size), or
    ValueError."""
    return check_codes(codes, self.grid, self.codebook_size)

  def encode(self, images) -> np.ndarray:
    """uint8 [N, R, R, 3] -> int32 [N, R/f, R/f]."""
    images = self.check_images(images)
    return self._batched(self.trainer.encode_fn, images, np.int32, self.grid)

  def decode(self, codes) -> np.ndarray:
    """int [N, h, w] (the trained grid) in [0, codebook_size) -> uint8 [N, h*f, w*f, 3]."""
    codes = self.check_codes(codes)
    f = self.downsample
    return self._batched(self.trainer.decode_fn, codes, np.uint8,
                         (codes.shape[1] * f, codes.shape[2] * f, 3))

  def _batched(self, fn, x, dtype, item_shape):
    if not len(x):
      return np.zeros((0,) + tuple(item_shape), dtype)
    run = lambda chunk: fn(self.params, chunk)
    return parallel.map_batches(run, x, self.batch_size, self.trainer.batch_shards).astype(dtype)
