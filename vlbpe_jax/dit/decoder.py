"""Pixels from CLIP features: a conv decoder trained by regression on (CLIP(image), image) pairs.

BLIP3-o turns generated EVA-CLIP features into pixels with Emu2's pretrained SDXL decoder, which
we cannot download; this is ours: the VQ-GAN decoder's architecture (`vq/autoencoder.Decoder`:
ResBlocks, mid attention, upsampling, depth-to-space) from the standardised feature grid
[B, g, g, D] to [B, R, R, 3], trained with L2 on the training split. Its ceiling is the scene
checker's score on decoder(CLIP(real image)) (the stage reports it).

  net = make(config, feature_dim)          # f = R / g pixels per feature cell
  s, state = train_decoder(config, workdir, feats, images)   # $W/pixel_decoder/, resumes
  images = decode(s, state["params"], feats)                  # uint8 [N, R, R, 3]
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from vlbpe_jax import checkpoint
from vlbpe_jax import fileio
from vlbpe_jax import loop
from vlbpe_jax import parallel
from vlbpe_jax import sharded_trainer
from vlbpe_jax.data import pipeline
from vlbpe_jax.dit import targets
from vlbpe_jax.vq import autoencoder

MUST_MATCH = ("seed", "data", "clip", "dit.decoder")
RUN_DIR = "pixel_decoder"  # under the workdir: the pipeline's `pixel_decoder` stage


def make(config, feature_dim: int) -> autoencoder.Decoder:
  """Decoder from a clip.grid-square feature grid to data.resolution pixels."""
  c = config.dit.decoder
  f = int(config.data.resolution) // int(config.clip.grid)
  levels = len(c.ch_mult)
  patch = f // 2 ** (levels - 1)
  if patch < 1 or patch * 2 ** (levels - 1) != f:
    raise ValueError(f"dit.decoder.ch_mult={tuple(c.ch_mult)}: {levels} levels cannot upsample "
                     f"by f = data.resolution / clip.grid = {f} (needs f = patch * 2**(levels-1))")
  return autoencoder.Decoder(ch=int(c.ch), ch_mult=tuple(c.ch_mult), num_res_blocks=int(
      c.num_res_blocks), z_channels=feature_dim, groups=int(c.groups), patch=patch)


def loss_fn(params, batch, key, frozen, *, net):
  del key, frozen
  rec = net.apply({"params": params}, batch["feats"])
  loss = jnp.mean(jnp.square(rec - batch["images"]))
  return loss, {"loss": loss, "psnr_db": 10.0 * jnp.log10(4.0 / jnp.maximum(loss, 1e-10))}


class _Pairs:
  def __init__(self, feats, images):
    self.feats, self.images = feats, images

  def __call__(self, index, rng):
    del rng
    i = int(index)
    return {"feats": self.feats[i], "images": self.images[i].astype(np.float32) / 127.5 - 1}


@dataclasses.dataclass
class Setup:
  net: autoencoder.Decoder
  trainer: sharded_trainer.Trainer
  stats: dict
  run_dir: str


def make_mesh(config):
  """The dit stage's one mesh (decoder, designs, frozen LM and CLIP): fitted to both trained
  batches, `dit.batch_size` and `dit.decoder.batch_size` (vlbpe_jax/parallel.py:plan_mesh)."""
  return parallel.mesh_from_config(
      config.mesh, batch_size=(config.dit.batch_size, config.dit.decoder.batch_size))


def setup(config, workdir, stats, mesh=None) -> Setup:
  """Decoder and trainer for features standardised by `stats` ({"mean", "std", "shape"})."""
  c = config.dit.decoder
  mesh = mesh or make_mesh(config)
  shape = tuple(stats["shape"])  # (g, g, D)
  net = make(config, shape[-1])
  init = lambda key: net.init(key, jnp.zeros((1,) + shape))["params"]  # noqa: E731
  tx = sharded_trainer.adamw_cosine(lr=float(c.lr), total_steps=int(c.total_steps),
                                    warmup_steps=int(c.warmup_steps),
                                    final_lr=float(c.lr) * 0.1, grad_clip=1.0)
  trainer = sharded_trainer.Trainer(init, functools.partial(loss_fn, net=net), tx, mesh)
  return Setup(net, trainer, dict(stats), os.path.join(workdir, RUN_DIR))


def restore(config, workdir, mesh=None):
  """The trained decoder: `(setup, params)` from `$W/pixel_decoder`."""
  run_dir = os.path.join(workdir, RUN_DIR)
  path = os.path.join(run_dir, "feature_stats.json")
  if not os.path.exists(path):
    raise ValueError(f"no {path}: run the 'pixel_decoder' stage first (it trains the decoder)")
  s = setup(config, workdir, fileio.read_json(path, what="decoder feature statistics"), mesh)
  return s, checkpoint.restore_latest(
      os.path.join(run_dir, "ckpt"), s.trainer.abstract_state, what="decoder",
      hint="run the 'pixel_decoder' stage first (it trains the decoder)")["params"]


def standardise(s: Setup, feats):
  return targets.standardise(feats, s.stats)


def train_decoder(config, workdir, feats, images, *, mesh=None, stop_at_step=None):
  """Trains (or resumes) the decoder on raw features [N, g, g, D] and uint8 images."""
  c = config.dit.decoder
  s = setup(config, workdir, targets.stats_of(feats), mesh)
  it = pipeline.sharded_iterator(
      functools.partial(pipeline.dataset, np.arange(len(feats)),
                        _Pairs(standardise(s, feats), images), seed=config.seed),
      batch_size=int(c.batch_size), data_shards=int(c.get("data_shards", 0)),
      section="dit.decoder")
  key_init, key_train = parallel.replicate(tuple(jax.random.split(jax.random.fold_in(
      jax.random.key(config.seed), 99))), s.trainer.mesh)
  if parallel.is_primary():
    fileio.write_json(os.path.join(s.run_dir, "feature_stats.json"), s.stats)
  state = loop.run(
      s.run_dir, s.trainer.abstract_state, lambda: s.trainer.init(key_init),
      lambda st, b: s.trainer.step(st, b, key_train), it, config=config, must_match=MUST_MATCH,
      total_steps=int(c.total_steps), log_every=int(c.log_every), ckpt_every=int(c.total_steps),
      name="pixel_decoder", progress=bool(config.dit.progress), stop_at_step=stop_at_step,
      items_per_step={"perf/images_per_s": int(c.batch_size)})
  return s, state


@functools.partial(jax.jit, static_argnames=("net",))
def _apply(net, params, z):  # module-level: compiles once per net and shape, not per call
  return net.apply({"params": params}, z)


def decode(s: Setup, params, feats, batch_size: int = 64):
  """Raw features [N, g, g, D] -> uint8 images [N, R, R, 3]."""
  mesh = s.trainer.mesh

  def run(chunk):
    with s.trainer.ctx():
      x = jax.device_get(_apply(s.net, params, parallel.shard_batch(chunk, mesh)))
    return np.round(np.clip((np.asarray(x) + 1) * 127.5, 0, 255)).astype(np.uint8)
  return parallel.map_batches(run, standardise(s, feats), batch_size,
                              parallel.batch_shards(mesh))
