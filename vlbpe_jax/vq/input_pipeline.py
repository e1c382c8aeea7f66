"""Training images for the VQ: shapes scenes rendered once into memory, served by grain.

  images = load_shapes(config, "train")                     # uint8 [N, R, R, 3]
  it = train_iterator(images, batch_size=16, seed=0)        # checkpointable grain iterator
  next(it)                                                  # uint8 [16 / processes, R, R, 3]
"""

import grain
import numpy as np

from vlbpe_jax.data import pipeline
from vlbpe_jax.data import shapes

_SPLIT_SIZES = {"train": "num_train", "validation": "num_validation", "test": "num_test"}


def load_shapes(config, split: str, num: int | None = None) -> np.ndarray:
  """The first `num` (default `config.data.num_<split>`) images of a shapes split."""
  if split not in _SPLIT_SIZES:
    raise ValueError(f"split={split!r} unknown; expected one of {sorted(_SPLIT_SIZES)}")
  num = config.data[_SPLIT_SIZES[split]] if num is None else num
  return shapes.make_images(split, 0, int(num), seed=config.seed,
                            resolution=config.data.resolution)


def train_iterator(images: np.ndarray, *, batch_size: int, seed: int, data_shards: int = 0):
  """Endless shuffled batches of this process's rows: uint8 [batch_size / processes, ...].

  The images are split `data_shards` ways (0: one shard per process) by stride, each shard
  shuffled and batched alone; a process concatenates its shards' batches
  (`pipeline.sharded_iterator`), so a fixed `data_shards` gives the same global batches for any
  process count dividing it.
  """
  if len(images) < batch_size:
    raise ValueError(f"{len(images)} training images < vq.batch_size={batch_size}")

  def shard_dataset(*, shard, batch_size):
    index, count = shard
    ds = grain.MapDataset.source(images)[index::count]
    ds = ds.shuffle(seed=seed).repeat().batch(batch_size, drop_remainder=True)
    return ds.to_iter_dataset(pipeline.READ_OPTIONS)

  return pipeline.sharded_iterator(shard_dataset, batch_size=batch_size,
                                   data_shards=data_shards, section="vq")
