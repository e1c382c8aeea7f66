"""Trains the VQ-GAN tokenizer on shapes images; resumes from `workdir/vq/ckpt`.

  python -m vlbpe_jax.vq.train --config=configs/vq_tiny.py --workdir=$W

Reads `config.vq` (model, losses, optimiser, schedule), `config.data` (num_train,
num_validation, resolution), `config.mesh` and `config.seed`. Writes under `$W/vq/`:
`ckpt/` (orbax), `events.out.tfevents.*` + `metrics.jsonl` (TensorBoard-readable scalars) and
`samples/step_NNNNNN.png` (validation grids, original | reconstruction).
"""

import contextlib
import functools
import os

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
from PIL import Image

from vlbpe_jax import checkpoint
from vlbpe_jax import cli
from vlbpe_jax import fileio
from vlbpe_jax import loop
from vlbpe_jax import parallel
from vlbpe_jax import sharded_trainer
from vlbpe_jax import summary
from vlbpe_jax.eval import report
from vlbpe_jax.vq import autoencoder
from vlbpe_jax.vq import discriminator as disc_lib
from vlbpe_jax.vq import input_pipeline
from vlbpe_jax.vq import layers
from vlbpe_jax.vq import losses
from vlbpe_jax.vq import metrics as metrics_lib
from vlbpe_jax.vq import model as model_lib
from vlbpe_jax.vq import perceptual
from vlbpe_jax.vq import quantizer

# Config keys a checkpoint must agree on before it is restored.
MUST_MATCH = ("vq.variant", "vq.codebook_size", "vq.code_dim", "vq.l2_normalize",
              "vq.disc_weight", "vq.disc_variant", "data.resolution")


def make_model(cfg) -> model_lib.VQModel:
  return model_lib.VQModel(variant=cfg.variant, codebook_size=cfg.codebook_size,
                           code_dim=cfg.code_dim, beta=cfg.beta, l2_normalize=cfg.l2_normalize,
                           dtype=jnp.dtype(cfg.dtype))


def make_discriminator(cfg):
  """The PatchGAN, or None when `vq.disc_weight == 0` (then the state holds no disc)."""
  if cfg.disc_weight <= 0:
    return None
  return disc_lib.make_discriminator(cfg.disc_variant, jnp.dtype(cfg.dtype))


def make_optimizer(cfg, lr: float):
  """Adam (taming betas) with linear warm-up, cosine decay to 10% and global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, cfg.warmup_steps, max(cfg.total_steps, cfg.warmup_steps + 1), lr * 0.1)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adam(schedule, b1=cfg.b1, b2=cfg.b2))


def load_perceptual(cfg):
  """LPIPS weights from `vq.perceptual_weights`, or None when the loss is off."""
  if cfg.perceptual_weight <= 0:
    return None
  if not cfg.perceptual_weights:
    raise ValueError(f"vq.perceptual_weight={cfg.perceptual_weight} needs a weights file in "
                     "vq.perceptual_weights (no random perceptual weights); set the weight to 0")
  return perceptual.load_lpips(cfg.perceptual_weights)


def init_state(key, cfg, resolution: int):
  """The train state, parameters boxed with logical names (run under eval_shape / jit)."""
  model, disc = make_model(cfg), make_discriminator(cfg)
  k_model, k_disc = jax.random.split(key)
  x = jnp.zeros((1, resolution, resolution, 3), jnp.float32)
  params = model.init(k_model, x)["params"]
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt": make_optimizer(cfg, cfg.lr).init(params),
           # Zero usage: the first restart re-seeds every code no batch has picked yet.
           "usage": jnp.zeros((cfg.codebook_size,), jnp.float32)}
  if disc is not None:
    state["disc_params"] = disc.init(k_disc, x)["params"]
    state["disc_opt"] = make_optimizer(cfg, cfg.disc_lr).init(state["disc_params"])
  return state


def generator_loss(params, disc_params, lpips_params, x, step, *, cfg):
  """x: [B, H, W, 3] in [-1, 1]. Returns (loss, (metrics, x_rec, z_e, counts))."""
  model, disc = make_model(cfg), make_discriminator(cfg)
  (x_rec, aux), inter = model.apply({"params": params}, x, mutable=["intermediates"])

  def nll_of(x_rec):
    nll = losses.reconstruction(x, x_rec, cfg.recon_loss)
    if lpips_params is not None:
      nll += cfg.perceptual_weight * jnp.mean(perceptual.lpips(lpips_params, x, x_rec))
    return nll

  nll = nll_of(x_rec)
  loss = nll + aux["quant_loss"]
  m = {"rec_loss": losses.reconstruction(x, x_rec, cfg.recon_loss), "nll": nll,
       "quant_loss": aux["quant_loss"], "batch_usage": aux["usage"],
       "perplexity": aux["perplexity"]}
  if disc is not None:
    # Adaptive weight: gradients of both losses at the decoder's last conv only.
    h = inter["intermediates"]["decoder"]["features"][0]
    w_last = params["decoder"]["conv_out"]
    last = layers.conv(w_last["kernel"].shape[-1], 3, out_axis=None, dtype=jnp.dtype(cfg.dtype))
    patch = autoencoder.decode_variant(cfg.variant).get("patch", 1)
    x_of = lambda w: autoencoder.depth_to_space(last.apply({"params": w}, h),
                                                patch).astype(jnp.float32)
    gan_of = lambda w: losses.hinge_g_loss(disc.apply({"params": disc_params}, x_of(w)))
    g_loss = losses.hinge_g_loss(disc.apply({"params": disc_params}, x_rec))
    gan, weight = losses.adaptive_gan_term(lambda w: nll_of(x_of(w)), gan_of, w_last, g_loss,
                                           step, disc_weight=cfg.disc_weight,
                                           disc_start=cfg.disc_start)
    loss += gan
    m.update(g_loss=g_loss, adaptive_weight=weight)
  return loss, (dict(m, loss=loss), x_rec, aux["z_e"], aux["counts"])


def train_step(state, images, key, lpips_params, *, cfg):
  """One generator (+ discriminator) update. images: uint8 [B, H, W, 3]."""
  step = state["step"]
  key = jax.random.fold_in(key, step)
  x = images.astype(jnp.float32) / 127.5 - 1.0
  (m, x_rec, z_e, counts), params, opt, norms = sharded_trainer.descend(
      functools.partial(generator_loss, cfg=cfg), make_optimizer(cfg, cfg.lr), state["params"],
      state["opt"], state.get("disc_params"), lpips_params, x, step)
  # Running code usage; every `restart_every` steps dead codes restart from encoder outputs.
  usage = cfg.usage_decay * state["usage"] + (1 - cfg.usage_decay) * counts / jnp.sum(counts)
  book = params["quantize"]["embedding"]
  z_flat = jax.lax.stop_gradient(z_e.reshape(-1, z_e.shape[-1]))  # [N, D]
  # New codes are drawn where the codebook fits worst (probability ~ quantisation error).
  err = quantizer.quantization_error(z_flat, book, cfg.l2_normalize)
  new_book, new_usage, n_dead = quantizer.restart_dead_codes(
      book, usage, z_flat, key, threshold=cfg.restart_threshold, weights=err)
  restart = ((cfg.restart_every > 0) & ((step + 1) % max(cfg.restart_every, 1) == 0)
             & (step < cfg.restart_until))
  params = {**params, "quantize": {"embedding": jnp.where(restart, new_book, book)}}
  new_state = dict(state, step=step + 1, params=params, opt=opt,
                   usage=jnp.where(restart, new_usage, usage))
  # l2_params after a restart (descend's, before it, goes unused: XLA drops its computation).
  m.update(norms, l2_params=sharded_trainer.l2(params),
           restarted_codes=jnp.where(restart, n_dead, 0))
  disc = make_discriminator(cfg)
  if disc is not None:
    def d_loss_fn(dp):
      real = disc.apply({"params": dp}, x)
      fake = disc.apply({"params": dp}, jax.lax.stop_gradient(x_rec))
      d_loss = (step >= cfg.disc_start).astype(jnp.float32) * losses.hinge_d_loss(real, fake)
      return d_loss, d_loss
    m["d_loss"], d_params, d_opt, _ = sharded_trainer.descend(
        d_loss_fn, make_optimizer(cfg, cfg.disc_lr), state["disc_params"], state["disc_opt"])
    new_state.update(disc_params=d_params, disc_opt=d_opt)
  return new_state, m


def encode_images(params, images, *, cfg):
  """uint8 [B, H, W, 3] -> int32 codes [B, H/f, W/f] (`VQModel.encode`)."""
  x = images.astype(jnp.float32) / 127.5 - 1.0
  return make_model(cfg).apply({"params": params}, x, method=model_lib.VQModel.encode)


def decode_codes(params, codes, *, cfg):
  """int32 codes [B, h, w] -> uint8 [B, h*f, w*f, 3] (`VQModel.decode`, clipped, rounded)."""
  return to_uint8(make_model(cfg).apply({"params": params}, codes,
                                        method=model_lib.VQModel.decode))


def eval_step(params, images, *, cfg):
  """uint8 [B, H, W, 3] -> (reconstruction uint8, codes [B, h, w], psnr [B], ssim [B]).

  Goes through the public halves `encode` then `decode`, as the CLIs do.
  """
  codes = encode_images(params, images, cfg=cfg)
  rec = decode_codes(params, codes, cfg=cfg)
  a, b = images.astype(jnp.float32) / 255.0, rec.astype(jnp.float32) / 255.0
  return rec, codes, metrics_lib.psnr(a, b), metrics_lib.ssim(a, b)


def to_uint8(x):
  """[-1, 1] float -> uint8 [0, 255] (clipped, rounded)."""
  return jnp.round(jnp.clip((x + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)


class Trainer:
  """Sharded state creation, jitted steps and checkpoint I/O for one config and mesh."""

  def __init__(self, config, mesh=None):
    self.config, self.cfg = config, config.vq
    self.mesh = (parallel.mesh_from_config(config.mesh, batch_size=self.cfg.batch_size)
                 if mesh is None else mesh)
    self.rules = parallel.LOGICAL_AXIS_RULES
    res = config.data.resolution
    init = functools.partial(init_state, cfg=self.cfg, resolution=res)
    with self._ctx():
      abstract = jax.eval_shape(init, jax.random.key(0))
      self.state_sharding = parallel.logical_shardings(abstract, self.mesh, self.rules)
    self.abstract_state = checkpoint.abstract_like(nn.unbox(abstract), self.state_sharding)
    self._init = parallel.Together(
        jax.jit(lambda k: nn.unbox(init(k)), out_shardings=self.state_sharding), "vq init")
    repl = parallel.replicated(self.mesh)
    img_sh = parallel.batch_sharding(self.mesh, 4)
    self._step = parallel.Together(jax.jit(
        functools.partial(train_step, cfg=self.cfg),
        in_shardings=(self.state_sharding, img_sh, repl, repl),
        out_shardings=(self.state_sharding, repl), donate_argnums=(0,)), "vq step")
    p_sh, code_sh = self.state_sharding["params"], parallel.batch_sharding(self.mesh, 3)
    vec_sh = parallel.batch_sharding(self.mesh, 1)
    self._eval = parallel.Together(jax.jit(
        functools.partial(eval_step, cfg=self.cfg), in_shardings=(p_sh, img_sh),
        out_shardings=(img_sh, code_sh, vec_sh, vec_sh)), "vq eval")
    self._encode = jax.jit(functools.partial(encode_images, cfg=self.cfg),
                           in_shardings=(p_sh, img_sh), out_shardings=code_sh)
    self._decode = jax.jit(functools.partial(decode_codes, cfg=self.cfg),
                           in_shardings=(p_sh, code_sh), out_shardings=img_sh)

  @contextlib.contextmanager
  def _ctx(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def init(self, key):
    with self._ctx():
      return self._init(key)

  def step(self, state, images, key, lpips_params=None):
    with self._ctx():
      return self._step(state, parallel.shard_batch(images, self.mesh), key, lpips_params)

  def encode_fn(self, params, images):
    """Host uint8 [B, H, W, 3] (B divisible by the batch shards) -> host int32 codes."""
    with self._ctx():
      return parallel.fetch(self._encode(params, parallel.shard_global_batch(images, self.mesh)))

  def decode_fn(self, params, codes):
    """Host int32 codes [B, h, w] -> host uint8 images."""
    with self._ctx():
      return parallel.fetch(self._decode(params, parallel.shard_global_batch(codes, self.mesh)))

  @property
  def batch_shards(self) -> int:
    """How many ways a batch is split (the product of the data and fsdp mesh axes)."""
    return parallel.batch_shards(self.mesh)

  def reconstruct(self, params, images, batch_size: int | None = None):
    """uint8 images [N, H, W, 3] (host) -> (recon uint8, codes, psnr [N], ssim [N]) on host."""
    def run(chunk):
      with self._ctx():
        return parallel.fetch(self._eval(params, parallel.shard_global_batch(chunk, self.mesh)))
    return parallel.map_batches(run, images, batch_size or self.cfg.batch_size, self.batch_shards)


def evaluate(trainer, params, images) -> tuple[dict, np.ndarray]:
  """Validation metrics (PSNR/SSIM means, codebook usage, perplexity) and reconstructions."""
  rec, codes, psnr, ssim = trainer.reconstruct(params, images)
  counts = np.bincount(codes.reshape(-1), minlength=trainer.cfg.codebook_size)
  p = counts[counts > 0] / counts.sum()
  return {"psnr_db": float(np.mean(psnr)), "ssim": float(np.mean(ssim)),
          "codebook_usage": float(np.mean(counts > 0)),
          "perplexity": float(np.exp(-np.sum(p * np.log(p))))}, rec


def comparison_grid(images, rec, ncols: int = 4) -> np.ndarray:
  """Rows of (original | reconstruction) pairs: uint8 [rows*H, ncols*2W (+gaps), 3]."""
  return report.image_grid(np.concatenate([images, rec], axis=2), ncols)  # pairs [N, H, 2W, 3]


def _check_config(config):
  cfg = config.vq
  for name in ("batch_size", "total_steps", "codebook_size", "code_dim", "log_every",
               "eval_every", "ckpt_every"):
    if int(cfg[name]) <= 0:
      raise ValueError(f"vq.{name}={cfg[name]!r}; expected a positive int")
  if int(config.data.num_validation) <= 0:
    raise ValueError(f"data.num_validation={config.data.num_validation!r}; the VQ needs "
                     "validation images for its metrics")
  if cfg.recon_loss not in losses.RECON_LOSSES:
    raise ValueError(f"vq.recon_loss={cfg.recon_loss!r} unknown; expected one of "
                     f"{losses.RECON_LOSSES}")
  f = model_lib.VQModel(cfg.variant).downsample
  if config.data.resolution % f:
    raise ValueError(f"data.resolution={config.data.resolution} is not divisible by the "
                     f"downsampling factor {f} of vq.variant={cfg.variant!r}")


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains to `vq.total_steps` (resuming), evaluates, returns the final validation metrics."""
  _check_config(config)
  cfg = config.vq
  vq_dir = os.path.join(workdir, "vq")
  trainer = Trainer(config)
  lpips_params = load_perceptual(cfg)
  train_images = input_pipeline.load_shapes(config, "train")
  val_images = input_pipeline.load_shapes(config, "validation")
  data_iter = input_pipeline.train_iterator(train_images, batch_size=cfg.batch_size,
                                            seed=config.seed,
                                            data_shards=int(cfg.get("data_shards", 0)))
  key_init, key_train, lpips_params = parallel.replicate(
      (*jax.random.split(jax.random.key(config.seed)), lpips_params), trainer.mesh)
  ckpt_dir = os.path.join(vq_dir, "ckpt")
  val = {}
  with checkpoint.Checkpointer(ckpt_dir, config=config, must_match=MUST_MATCH) as ckpt:
    state, first, seconds = loop.restore_or_init(
        ckpt, trainer.abstract_state, lambda: trainer.init(key_init), data_iter)
    with summary.MetricWriter(vq_dir, resume_step=first) as writer:

      def evaluate_at(step, state):
        metrics, rec = evaluate(trainer, state["params"], val_images)
        val.update(metrics)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in val.items()})
        logging.info("vq step %d: %s", step, val)
        if parallel.is_primary():
          _save_grid(vq_dir, step, val_images[:cfg.grid_images], rec[:cfg.grid_images])

      state = loop.fit(
          state, lambda state, images: trainer.step(state, images, key_train, lpips_params),
          data_iter, total_steps=cfg.total_steps, ckpt=ckpt, writer=writer,
          log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, name="vq",
          seconds_before=seconds, items_per_step={"perf/images_per_s": cfg.batch_size},
          progress=cfg.get("progress", True), after_step=evaluate_at, after_every=cfg.eval_every)
  if not val:  # nothing to train: evaluate the restored state
    val.update(evaluate(trainer, state["params"], val_images)[0])
  # Summed over every process that trained this run (resumes included), up to the last save.
  val["train_seconds"] = loop.train_seconds(ckpt_dir)
  return val


def _save_grid(vq_dir, step, images, rec):
  with fileio.atomic_file(os.path.join(vq_dir, "samples", f"step_{step:06d}.png")) as tmp:
    Image.fromarray(comparison_grid(images, rec)).save(tmp, format="PNG")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  print(train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/vq_tiny.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (checkpoints under workdir/vq).")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
