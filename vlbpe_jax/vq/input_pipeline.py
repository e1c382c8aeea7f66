"""Training images for the VQ: shapes scenes rendered once into memory, served by grain.

  images = load_shapes(config, "train")                     # uint8 [N, R, R, 3]
  it = train_iterator(images, batch_size=16, seed=0)        # checkpointable grain iterator
  next(it)                                                  # uint8 [16 / processes, R, R, 3]
"""

import grain
import jax
import numpy as np

from vlbpe_jax.data import shapes

_SPLIT_SIZES = {"train": "num_train", "validation": "num_validation", "test": "num_test"}


def load_shapes(config, split: str, num: int | None = None) -> np.ndarray:
  """The first `num` (default `config.data.num_<split>`) images of a shapes split."""
  if split not in _SPLIT_SIZES:
    raise ValueError(f"split={split!r} unknown; expected one of {sorted(_SPLIT_SIZES)}")
  num = config.data[_SPLIT_SIZES[split]] if num is None else num
  return shapes.make_images(split, 0, int(num), seed=config.seed,
                            resolution=config.data.resolution)


def train_iterator(images: np.ndarray, *, batch_size: int, seed: int):
  """Endless shuffled batches of this process's rows: uint8 [batch_size / processes, ...]."""
  n_proc = jax.process_count()
  if batch_size % n_proc:
    raise ValueError(f"vq.batch_size={batch_size} does not split over {n_proc} processes")
  if len(images) < batch_size:
    raise ValueError(f"{len(images)} training images < vq.batch_size={batch_size}")
  ds = grain.MapDataset.source(images)[jax.process_index()::n_proc]
  ds = ds.shuffle(seed=seed).repeat().batch(batch_size // n_proc, drop_remainder=True)
  return iter(ds)
