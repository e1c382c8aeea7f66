"""Trains BLIP3-o's generator on the shapes data: queries through the frozen LM condition a DiT.

  python -m vlbpe_jax.dit.train --config=configs/tiny.py --workdir=$W [--design=fm]

Needs in `$W`: the `data` stage (tfds shapes, tokenizer), the unified LM's `full` run (the frozen
backbone, `lm/full/ckpt`) and the CLIP (`clip/ckpt`); `vq_latent` also needs the VQ (`vq/ckpt`).
Designs (the seed's study, same budget):
  fm         CLIP features + flow matching: the DiT (`model.py`) learns the velocity eps - x0 of
             x_t = (1 - s) x0 + s eps on the pooled CLIP patch features (the chosen design)
  mse        CLIP features + MSE regression: a projection W of the query states, ||W Q - X||^2
  vq_latent  VQ-encoder latents (the code vectors of the VQ grid) + flow matching, decoded by
             the VQ's own decoder (the seed's VAE + FM)
Trainable: the learnable queries (`dit.num_queries` x LM width) and the DiT (or W); the LM's
params are only an argument of the step (`sharded_trainer`), so they stay bit-identical. The
targets are standardised per channel by their training-set statistics (`targets.py`); BLIP3-o
feeds raw EVA-CLIP features. Each design lives in `$W/dit/<design>/` (orbax `ckpt/`,
`metrics.jsonl`) and resumes. Reads `config.dit.*`, `config.clip.*` (targets),
`config.lm.*` (backbone), `config.seed`, `config.mesh`.
"""

import dataclasses
import functools
import json
import os

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from vlbpe_jax import checkpoint
from vlbpe_jax import cli
from vlbpe_jax import fileio
from vlbpe_jax import loop
from vlbpe_jax import parallel
from vlbpe_jax import sharded_trainer
from vlbpe_jax.clip import train as clip_train
from vlbpe_jax.data import pipeline
from vlbpe_jax.data import stage as data_stage
from vlbpe_jax.dit import decoder as decoder_lib
from vlbpe_jax.dit import flow
from vlbpe_jax.dit import model as dit_model
from vlbpe_jax.dit import queries as queries_lib
from vlbpe_jax.dit import sampler
from vlbpe_jax.dit import targets
from vlbpe_jax.lm import sequences
from vlbpe_jax.lm import train as lm_train

DESIGNS = ("fm", "mse", "vq_latent")
# Config keys a checkpoint must agree on before it is restored (the CLIP's and LM's too: they
# make the targets and the conditions).
MUST_MATCH = ("seed", "data", "dit", "clip", "lm.seed", "lm.variant", "lm.model",
              "lm.stage_steps", "lm.text_steps")


def check_config(config, design: str):
  if design not in DESIGNS:
    raise ValueError(f"design={design!r}: expected one of {DESIGNS}")
  c = config.dit
  for name in ("batch_size", "total_steps", "log_every", "ckpt_every", "num_queries",
               "prompt_len", "sample_steps"):
    if int(c[name]) < 1:
      raise ValueError(f"dit.{name}={c[name]!r}: expected a positive int")
  if not 0.0 <= float(c.cfg_dropout) < 1.0:
    raise ValueError(f"dit.cfg_dropout={c.cfg_dropout!r}: expected in [0, 1)")
  if design == "mse" and int(c.num_queries) != int(config.clip.grid) ** 2:
    raise ValueError(f"dit.num_queries={c.num_queries} must equal clip.grid**2="
                     f"{int(config.clip.grid) ** 2} for the mse design (one query per token)")


class Head(nn.Module):
  """The MSE design's W: query states [B, Q, Dq] -> features [B, Q, C] (one Linear)."""
  channels: int

  @nn.compact
  def __call__(self, q):
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    return nn.Dense(self.channels, kernel_init=init, name="proj")(q.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Backbone:
  """The frozen LM: model, params (on the mesh), tokenizer, whether it uses 2D RoPE."""
  model: object
  params: object
  tok: object
  grid: bool

  def encode(self, captions, config):
    c = config.dit
    return queries_lib.encode_prompts(self.tok.encode, captions, template=c.prompt_template,
                                      max_len=int(c.prompt_len), bos_id=self.tok.bos_id)


def load_backbone(config, workdir: str, mesh) -> Backbone:
  """The `full` run of the unified LM (Being-VL), restored from `$W/lm/full/ckpt`."""
  tok = data_stage.load_tokenizer(workdir)
  _, num_vq, num_bpe = sequences.load_visual_tokens(
      workdir, "bpe", vq_start=lm_train.text_rows(config, tok))
  model = lm_train.make_model(config, tok, num_vq, num_bpe)
  trainer = lm_train.Trainer(config, model, mesh)
  plan = lm_train.plan_of(config, "full")
  path = os.path.join(workdir, "lm", "full", "ckpt")
  state = checkpoint.restore_latest(path, trainer.abstract_state(plan[-1]), what="LM",
                                    hint="run the 'lm' stage (run 'full') first")
  return Backbone(model, state["params"], tok, lm_train.grid_positions(config))


def target_shape(config, design, feature_dim, vq_grid=None):
  """(H, W, C) of the generated grid and the DiT patch size (64 tokens, BLIP3-o's count)."""
  if design == "vq_latent":
    h, w, c = vq_grid
    patch = max(1, h // int(config.clip.grid))
    return (h, w, c), patch
  g = int(config.clip.grid)
  return (g, g, feature_dim), 1


def make_model(config, design, shape, patch, cond_dim):
  if design == "mse":
    return Head(shape[-1])
  c = config.dit
  return dit_model.DiT(dit_model.config_for(
      c.variant, in_channels=shape[-1], grid=shape[:2], patch_size=patch, cond_dim=cond_dim,
      **dict(c.model)))


def init_fn(config, design, net, shape, cond_dim):
  c = config.dit
  q = int(c.num_queries)

  def init(key):
    k_q, k_net = jax.random.split(key)
    queries = nn.with_logical_partitioning(
        lambda k, s: float(c.query_init_std) * jax.random.normal(k, s), (None, "embed"))(
            k_q, (q, cond_dim))
    if design == "mse":
      params = net.init(k_net, jnp.zeros((1, q, cond_dim)))["params"]
    else:
      params = net.init(k_net, jnp.zeros((1,) + shape), jnp.zeros((1,)),
                        jnp.zeros((1, q, cond_dim)), jnp.ones((1, q), bool))["params"]
    return {"queries": queries, "net": params}
  return init


def loss_fn(params, batch, key, backbone_params, *, design, net, backbone, config):
  """Flow matching (fm, vq_latent) or regression (mse) of the batch's targets `x0`."""
  c = config.dit
  cond = queries_lib.query_states(backbone.model, backbone_params, params["queries"],
                                  batch["ids"], batch["mask"], grid=backbone.grid)
  x0 = batch["x0"]  # [B, H, W, C]
  if design == "mse":
    pred = net.apply({"params": params["net"]}, cond).reshape(x0.shape)
    loss = jnp.mean(jnp.square(pred - x0))
    return loss, {"loss": loss}
  k_drop, k_sigma, k_eps = jax.random.split(key, 3)
  cond, _ = flow.drop_conditions(k_drop, cond, float(c.cfg_dropout))
  sigma = flow.sample_sigma(k_sigma, x0.shape[0], kind=c.time_sampling, shift=float(c.shift))
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  x_t, target = flow.flow_path(x0, eps, sigma)
  mask = jnp.ones(cond.shape[:2], bool)
  pred = net.apply({"params": params["net"]}, x_t, sigma * 1000.0, cond, mask)
  loss = flow.flow_loss(pred, target)
  return loss, {"loss": loss}


class _Examples:
  """`(index, rng) -> {"ids", "mask", "x0"}`: one of the example's captions and its target."""

  def __init__(self, ids, mask, x0):
    self.ids, self.mask, self.x0 = ids, mask, x0  # [N, K, T], [N, K, T], [N, H, W, C]

  def __call__(self, index, rng):
    i = int(index)
    k = int(rng.integers(self.ids.shape[1]))
    return {"ids": self.ids[i, k], "mask": self.mask[i, k], "x0": self.x0[i]}


def encode_captions(backbone, captions, config):
  """Lists of captions (K per example) -> ids, mask [N, K, T]."""
  k = len(captions[0])
  ids, mask = backbone.encode([t for c in captions for t in c], config)
  return ids.reshape(len(captions), k, -1), mask.reshape(len(captions), k, -1)


def vq_latents(vq, codes):
  """int codes [N, h, w] -> the VQ's code vectors [N, h, w, d] (its lookup table)."""
  from vlbpe_jax.vq import quantizer  # pylint: disable=g-import-not-at-top
  table = np.asarray(quantizer.lookup_table(vq.params["quantize"]["embedding"],
                                            bool(vq.config.vq.l2_normalize)))
  return table[np.asarray(codes)]


def vq_codes_of(vq, latents):
  """Generated latents [N, h, w, d] -> the nearest code of the VQ's table [N, h, w]."""
  from vlbpe_jax.vq import quantizer  # pylint: disable=g-import-not-at-top
  table = vq.params["quantize"]["embedding"]
  return np.asarray(quantizer.nearest_codes(jnp.asarray(latents), table,
                                            bool(vq.config.vq.l2_normalize)))


@dataclasses.dataclass
class Setup:
  """What one design trains on and with."""
  design: str
  net: object
  trainer: sharded_trainer.Trainer
  backbone: Backbone
  shape: tuple
  stats: dict
  run_dir: str


def setup(config, workdir, design, *, shape, stats, backbone=None, mesh=None) -> Setup:
  """Models and trainer of `design` for targets of `shape` (H, W, C) standardised by `stats`
  (`targets.stats_of` of the raw training targets)."""
  check_config(config, design)
  mesh = mesh or decoder_lib.make_mesh(config)
  backbone = backbone or load_backbone(config, workdir, mesh)
  cond_dim = backbone.model.config.width
  shape, patch = target_shape(config, design, shape[-1], tuple(shape))
  net = make_model(config, design, shape, patch, cond_dim)
  c = config.dit
  tx = sharded_trainer.adamw_cosine(
      lr=float(c.lr), total_steps=int(c.total_steps),
      warmup_steps=int(c.warmup_steps), final_lr=float(c.lr) * float(c.final_lr_frac),
      grad_clip=float(c.grad_clip), weight_decay=float(c.weight_decay))
  loss = functools.partial(loss_fn, design=design, net=net, backbone=backbone, config=config)
  trainer = sharded_trainer.Trainer(init_fn(config, design, net, shape, cond_dim), loss, tx,
                                    mesh)
  return Setup(design, net, trainer, backbone, shape, dict(stats),
               os.path.join(workdir, "dit", design))


def load_setup(config, workdir, design, *, backbone=None, mesh=None) -> Setup:
  """The `Setup` of a trained design, its target shape and stats read from its run dir."""
  path = os.path.join(workdir, "dit", design, "target_stats.json")
  if not os.path.exists(path):
    raise ValueError(f"no {path}: train design {design!r} first (python -m vlbpe_jax.dit.train)")
  stats = fileio.read_json(path, what="DiT target statistics")
  return setup(config, workdir, design, shape=tuple(stats["shape"]), stats=stats,
               backbone=backbone, mesh=mesh)


def train(config, s: Setup, captions, train_x0, *, stop_at_step=None):
  """Trains (or resumes) design `s` to `dit.total_steps`; returns the state."""
  c = config.dit
  ids, mask = encode_captions(s.backbone, captions, config)
  x0 = targets.standardise(train_x0, s.stats)
  it = pipeline.sharded_iterator(
      functools.partial(pipeline.dataset, np.arange(len(x0)), _Examples(ids, mask, x0),
                        seed=config.seed),
      batch_size=int(c.batch_size), data_shards=int(c.get("data_shards", 0)), section="dit")
  key_init, key_train = parallel.replicate(tuple(jax.random.split(jax.random.fold_in(
      jax.random.key(config.seed), DESIGNS.index(s.design)))), s.trainer.mesh)
  if parallel.is_primary():
    fileio.write_json(os.path.join(s.run_dir, "target_stats.json"), s.stats)
  state = loop.run(
      s.run_dir, s.trainer.abstract_state, lambda: s.trainer.init(key_init),
      lambda st, b: s.trainer.step(st, b, key_train, s.backbone.params), it, config=config,
      must_match=MUST_MATCH, total_steps=int(c.total_steps), log_every=int(c.log_every),
      ckpt_every=int(c.ckpt_every), name=f"dit/{s.design}", progress=bool(c.progress),
      stop_at_step=stop_at_step, items_per_step={"perf/examples_per_s": int(c.batch_size)})
  return state


def restore(s: Setup):
  return checkpoint.restore_latest(os.path.join(s.run_dir, "ckpt"), s.trainer.abstract_state,
                                   what="DiT", hint=f"train design {s.design!r} first")


def make_generate(config, s: Setup, *, num_samples: int, steps: int, guidance: float):
  """A jitted `(params, ids, mask, key) -> [P * num_samples, H, W, C]` (de-standardised):
  `num_samples` per prompt, prompt-major. mse ignores the key (one output per prompt)."""
  bb = s.backbone

  def generate(params, backbone_params, ids, mask, key):
    cond = queries_lib.query_states(bb.model, backbone_params, params["queries"], ids, mask,
                                    grid=bb.grid)  # [P, Q, D]
    cond = jnp.repeat(cond, num_samples, axis=0)  # [P*S, Q, D]
    if s.design == "mse":
      x = s.net.apply({"params": params["net"]}, cond).reshape((cond.shape[0],) + s.shape)
    else:
      fn = lambda x, t, y, m: s.net.apply({"params": params["net"]}, x, t, y, m)  # noqa: E731
      x = sampler.euler_sample(fn, key, (cond.shape[0],) + s.shape, cond=cond,
                               cond_mask=jnp.ones(cond.shape[:2], bool), steps=steps,
                               guidance=guidance, shift=float(config.dit.shift))
    return x * jnp.asarray(s.stats["std"]) + jnp.asarray(s.stats["mean"])
  return jax.jit(generate)


def generate(config, s: Setup, params, captions, key, *, num_samples: int, steps=None,
             guidance=None, batch_size: int = 32):
  """Captions -> generated targets [P, S, H, W, C] (host), batched over prompts."""
  c = config.dit
  fn = make_generate(config, s, num_samples=num_samples,
                     steps=int(steps or c.sample_steps),
                     guidance=float(c.guidance if guidance is None else guidance))
  ids, mask = s.backbone.encode(list(captions), config)
  mesh = s.trainer.mesh
  out = []
  for i in range(0, len(ids), batch_size):
    chunk_ids, chunk_mask = ids[i:i + batch_size], mask[i:i + batch_size]
    n = len(chunk_ids)
    pad = -n % parallel.batch_shards(mesh)
    if pad:  # whole prompts, so that the batch splits over the mesh
      chunk_ids = np.concatenate([chunk_ids, np.repeat(chunk_ids[-1:], pad, 0)])
      chunk_mask = np.concatenate([chunk_mask, np.repeat(chunk_mask[-1:], pad, 0)])
    with s.trainer.ctx():
      x = fn(params, s.backbone.params, *parallel.shard_batch((chunk_ids, chunk_mask), mesh),
             jax.random.fold_in(key, i))
      x = np.asarray(jax.device_get(x))
    out.append(x.reshape((len(chunk_ids), num_samples) + s.shape)[:n])
  return np.concatenate(out)


def train_design(config, workdir, design, *, stop_at_step=None):
  """One design end to end from the workdir's files: returns (setup, state)."""
  check_config(config, design)  # before any file is read
  mesh = decoder_lib.make_mesh(config)
  data = data_stage.load_scenes(config, workdir, "train")
  if design == "vq_latent":
    from vlbpe_jax.vq import tokenizer as vq_tokenizer  # pylint: disable=g-import-not-at-top
    vq = vq_tokenizer.Tokenizer.from_workdir(workdir, mesh=mesh)
    x0 = vq_latents(vq, vq.encode(data["images"]))
  else:
    model, params, _ = clip_train.restore(config, workdir, mesh)
    x0 = clip_train.grid_features(model, params, data["images"], mesh, int(config.clip.grid))
  s = setup(config, workdir, design, shape=x0.shape[1:], stats=targets.stats_of(x0), mesh=mesh)
  return s, train(config, s, data["captions"], x0, stop_at_step=stop_at_step)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  jax.config.update("jax_threefry_partitionable", True)
  s, state = train_design(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.design)
  print(json.dumps({"design": s.design, "step": int(jax.device_get(state["step"])),
                    "run_dir": s.run_dir}))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/tiny.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Pipeline directory (the DiT writes under workdir/dit).")
  flags.DEFINE_enum("design", "fm", DESIGNS, "Which design of the seed's study to train.")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
