"""Ahead-of-time checks of real-size configs: an abstract sharded state, one lowered train step
and a per-device memory estimate, with no accelerator and nothing of the model's size allocated.

  config = load("configs/beingvl_8b.py:target=v5p-64")   # any config with `stages` lm/dit/v2l
  job = build(config)                  # the trainer's jitted step + ShapeDtypeStructs to lower
  lowered = lower(job)                 # StableHLO for the target's platform and mesh
  print(memory(job))                   # GiB per device: state, frozen, activations (estimate)

The mesh is a `jax.sharding.AbstractMesh` of the target's shape (`config.target.devices`
chips; `parallel.plan_mesh` fixes the sizes), so a 64-chip slice lowers on a laptop (MaxText's
train_compile does this with a mock TPU topology, which needs libtpu). Compiling needs real
devices: `build(config, devices=jax.devices())` puts the same axes on the local devices.
Steps and state layouts are the stages' own (`lm.train.Trainer`, `sharded_trainer.Trainer`).
"""

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from vlbpe_jax import parallel
from vlbpe_jax.dit import train as dit_train
from vlbpe_jax.lm import model as lm_model
from vlbpe_jax.lm import train as lm_train
from vlbpe_jax.v2l import train as v2l_train

GIB = 2**30


@dataclasses.dataclass
class Job:
  """One train step ready to lower: `fn(*args)` under `ctx()`."""
  name: str
  config: object
  mesh: object
  fn: object
  args: tuple  # (state, batch, key[, frozen]) as ShapeDtypeStructs with shardings
  ctx: object
  activations: float  # bytes per device, `activation_bytes`' estimate


def load(spec: str):
  """`path[:arg]` -> the config file's `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def make_mesh(config, batch_size, devices=None):
  """`config.mesh` over the target's chips (abstract) or over `devices` (a real mesh)."""
  n = int(config.target.devices) if devices is None else len(devices)
  if devices is not None:
    return parallel.mesh_from_config(config.mesh, devices, batch_size=batch_size)
  axes, _ = parallel.plan_mesh([tuple(a) for a in config.mesh], n, batch_size)
  return AbstractMesh(tuple(s for _, s in axes), tuple(a for a, _ in axes),
                      axis_types=(AxisType.Auto,) * len(axes))


def _spec(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _batch(mesh, **arrays):
  """{name: (shape, dtype)} -> ShapeDtypeStructs split over the batch axes."""
  return {k: _spec(s, d, parallel.batch_sharding(mesh, len(s))) for k, (s, d) in arrays.items()}


def _key(mesh):
  return _spec((), jax.eval_shape(lambda: jax.random.key(0)).dtype, parallel.replicated(mesh))


def _lm(config, vocab):
  return lm_model.LM(lm_model.lm_config(
      config.lm.variant, text_vocab=int(vocab.text), num_special=int(vocab.get("special", 0)),
      num_vq=int(vocab.get("vq", 0)), num_bpe=int(vocab.get("bpe", 0)),
      **dict(config.lm.get("model", {}))))


def _lm_job(config, mesh):
  """The unified LM's stage-3 step (every weight trained: the most state)."""
  c = config.lm
  model = _lm(config, c.vocab)
  trainer = lm_train.Trainer(config, model, mesh)
  phase = lm_train.Phase(3, 1, ("caption",), float(c.stage_lrs[-1]))
  b, t = int(c.batch_size), int(c.seq_len)
  ids = ((b, t), jnp.int32)
  batch = _batch(mesh, inputs=ids, targets=ids, segment_ids=ids, positions=ids,
                 loss_mask=((b, t), jnp.bool_))
  args = (trainer.abstract_state(phase), batch, _key(mesh))
  acts = activation_bytes(model.config, b * t // parallel.batch_shards(mesh), t,
                          mesh.shape.get("tensor", 1))
  return Job("lm", config, mesh, trainer.step_fn(phase), args, trainer.ctx, acts)


def _frozen_lm(config, mesh):
  """The frozen backbone: model and its params as ShapeDtypeStructs (sharded like training)."""
  model = _lm(config, config.lm.vocab)
  trainer = lm_train.Trainer(config, model, mesh)
  return model, jax.tree.map(lambda x, s: _spec(x.shape, x.dtype, s), trainer.abstract_params,
                             trainer.param_shardings)


def _dit_job(config, mesh):
  """The `fm` design's step: queries through the frozen LM condition the DiT."""
  c = config.dit
  lm, lm_params = _frozen_lm(config, mesh)
  backbone = dit_train.Backbone(lm, None, None, False)
  g, w = int(config.clip.grid), int(config.clip.width)
  s = dit_train.setup(config, "", "fm", shape=(g, g, w), stats={}, backbone=backbone, mesh=mesh)
  b, t = int(c.batch_size), int(c.prompt_len)
  batch = _batch(mesh, ids=((b, t), jnp.int32), mask=((b, t), jnp.bool_),
                 x0=((b, g, g, w), jnp.float32))
  args = (s.trainer.abstract_state, batch, _key(mesh), lm_params)
  rows = b // parallel.batch_shards(mesh)
  # The LM runs prompt + queries (forward, and backward at the queries); the DiT g*g tokens.
  acts = (activation_bytes(lm.config, rows * (t + int(c.num_queries)), t, 1, head=False)
          + activation_bytes(s.net.config, rows * g * g, g * g, 1, head=False))
  return Job("dit", config, mesh, s.trainer.step_fn, args, s.trainer.ctx, acts)


def _v2l_job(config, mesh):
  """The tokenizer's step; the CLIP table of the LM's vocabulary is a frozen input."""
  c = config.v2l
  e, r, v = int(config.clip.embed_dim), int(config.data.resolution), int(config.lm.vocab.text)
  model, trainer = v2l_train.make_trainer(config, e, mesh)
  b = int(c.batch_size)
  batch = _batch(mesh, images=((b, r, r, 3), jnp.float32),
                 global_emb=((b, int(c.num_global), e), jnp.float32))
  frozen = {"local_emb": _spec((v, e), jnp.float32, parallel.replicated(mesh)), "lpips": None}
  args = (trainer.abstract_state, batch, _key(mesh), frozen)
  mc = model.config
  rows = b // parallel.batch_shards(mesh)
  # Convolutions keep every level's feature maps for the backward pass (no remat), float32:
  # ~14 maps per residual block (2 GroupNorms with their statistics, 2 swishes, 2 convolutions,
  # copies), num_res_blocks + 1 blocks per level, encoder + decoder. 14 is calibrated on XLA's
  # CPU compile of the paper variant at 8 rows per device (8.9 GiB of temporaries).
  per_level = [mc.ch * m * (r // (mc.patch * 2**i)) ** 2 for i, m in enumerate(mc.ch_mult)]
  acts = 2 * 14 * (mc.num_res_blocks + 1) * rows * sum(per_level) * 4
  return Job("v2l", config, mesh, trainer.step_fn, args, trainer.ctx, acts)


JOBS = {"lm": _lm_job, "dit": _dit_job, "v2l": _v2l_job}


def build(config, devices=None) -> Job:
  """The step of `config.stages` (one of JOBS) on the target's abstract mesh (or `devices`)."""
  if config.stages not in JOBS:
    raise ValueError(f"stages={config.stages!r}: a real-size config sizes one of {sorted(JOBS)}")
  mesh = make_mesh(config, int(config[config.stages].batch_size), devices)
  return JOBS[config.stages](config, mesh)


def lower(job: Job, platform=None):
  """The step lowered (traced, partitioned for the mesh) for `platform` (default: the
  target's; "cpu" for a real local mesh)."""
  platform = platform or job.config.target.platform
  with job.ctx():
    return job.fn.trace(*job.args).lower(lowering_platforms=(platform,))


def activation_bytes(cfg, tokens, seq, tensor=1, head=True):
  """Activations held for the backward pass per device (an estimate, bytes).

  cfg: an LMConfig or DiTConfig; tokens: per device. Saved per layer and token, in the compute
  dtype: `full` remat the layer input (D); `dots` / `dots_no_batch` the matmul outputs
  (~q, k, v, o, 3 mlp: 4D + 3F); `none` ~ those plus norms and activations (8D + 5F). Plus one
  layer's working set recomputed in the backward pass (8D + 5F, attention blockwise) and, with
  `head`, the float32 logits, their softmax and gradient (3 x 4 bytes x V / tensor).
  """
  d = getattr(cfg, "width", getattr(cfg, "dim", 0))
  f = getattr(cfg, "mlp_dim", None) or cfg.ffn_dim
  depth = cfg.depth
  item = jnp.dtype(cfg.dtype).itemsize
  saved = {"full": d, "dots": 4 * d + 3 * f // tensor, "dots_no_batch": 4 * d + 3 * f // tensor,
           "none": 8 * d + 5 * f // tensor}[cfg.remat_policy]
  out = tokens * item * (depth * saved + 8 * d + 5 * f // tensor)
  if head:
    out += tokens * 12 * cfg.vocab_size // tensor
  return float(out)


def _shard_bytes(tree):
  """Bytes per device of a tree of ShapeDtypeStructs carrying NamedShardings (the largest
  shard, i.e. the first device's)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
  return total


def unsharded_large(tree, limit_bytes=64 * 2**20):
  """Paths of arrays over `limit_bytes` that no mesh axis (of size > 1) splits."""
  bad = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize <= limit_bytes:
      continue
    mesh = x.sharding.mesh
    used = [a for e in x.sharding.spec if e for a in (e if isinstance(e, tuple) else (e,))]
    if not any(mesh.shape[a] > 1 for a in used):
      bad.append(jax.tree_util.keystr(path))
  return bad


def memory(job: Job) -> dict:
  """Per-device GiB of the state (params + optimizer), frozen inputs, batch and activations,
  their total and whether it fits the target's HBM."""
  state, batch = job.args[0], job.args[1]
  frozen = job.args[3] if len(job.args) > 3 else None
  row = dict(params=_shard_bytes(state["params"]), opt=_shard_bytes(state["opt"]),
             frozen=_shard_bytes(frozen) if frozen is not None else 0,
             batch=_shard_bytes(batch), activations=job.activations)
  row = {k: v / GIB for k, v in row.items()}
  row["total"] = sum(row.values())
  hbm = float(job.config.target.hbm_gib)
  row["hbm"] = hbm
  row["fits"] = bool(hbm and row["total"] <= hbm)
  row["param_count"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  return row

