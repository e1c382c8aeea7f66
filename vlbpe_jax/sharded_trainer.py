"""One model's sharded train state and jitted step: one loss, one optimizer (CLIP, DiT, decoder,
V2L), optionally with a GAN discriminator trained beside it (V2L).

  trainer = Trainer(init_params, loss_fn, tx, mesh)      # init_params(key) -> boxed params
  state = trainer.init(key)                              # {"step", "params", "opt"}, sharded
  state, metrics = trainer.step(state, batch, key, frozen)  # batch: host numpy pytree

`loss_fn(params, batch, key, frozen) -> (loss, metrics)` is pure; `frozen` is any pytree the
loss reads but never trains (e.g. a frozen backbone's params, already on the mesh): it is an
argument of the step, not part of the state, so nothing can update it. The state is born
sharded (`eval_shape` -> logical names -> `NamedSharding`s -> `jit(out_shardings=...)`); the
step donates it, folds the step into the key and logs `l2_grads/l2_params/l2_updates`. The loop
around it (checkpoints, resume, logging, NaN stop) is `vlbpe_jax/loop.py`.

With `disc=Discriminator(init_params, loss_fn, tx)` the state also holds `disc_params` and
`disc_opt` (sharded by their logical names, checkpointed like the rest) and the step is
`gan_train_step`, the two-optimizer pattern of vq/train.py: the model's loss becomes
`loss_fn(params, batch, key, frozen, disc_params, step) -> (loss, (metrics, fake))` (the
discriminator's params enter it as constants), then the discriminator takes one step on
`disc.loss_fn(disc_params, batch, stop_gradient(fake), step) -> (loss, metrics)` from the
same (pre-update) discriminator params. Without `disc` nothing changes.
"""

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlbpe_jax import checkpoint
from vlbpe_jax import parallel


def adamw_cosine(*, lr: float, total_steps: int, warmup_steps: int, final_lr: float,
                 grad_clip: float = 1.0, weight_decay: float = 0.0, b1: float = 0.9,
                 b2: float = 0.999):
  """Global-norm clipping, then AdamW with linear warm-up and cosine decay to `final_lr`
  (BLIP3-o: 1e-4 -> 1e-5, 0.3% warm-up, no weight decay, clipping at 1.0)."""
  for name, v in (("total_steps", total_steps), ("lr", lr)):
    if not v > 0:
      raise ValueError(f"{name}={v!r}: expected > 0")
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_steps={warmup_steps}: expected 0 <= warmup < total_steps="
                     f"{total_steps}")
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, total_steps, final_lr)
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))


def l2(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def descend(loss_fn, tx, params, opt_state, *args):
  """One optimizer step on `loss_fn(params, *args) -> (loss, aux)`: returns `(aux, params,
  opt_state, {"l2_grads", "l2_params", "l2_updates"})`, the norms of the new params."""
  (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *args)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return aux, params, opt_state, {"l2_grads": l2(grads), "l2_params": l2(params),
                                  "l2_updates": l2(updates)}


def train_step(state, batch, key, frozen, *, loss_fn, tx):
  """One update of `state = {"step", "params", "opt"}`; returns `(state, metrics)`."""
  key = jax.random.fold_in(key, state["step"])
  metrics, params, opt, norms = descend(loss_fn, tx, state["params"], state["opt"], batch, key,
                                        frozen)
  return {"step": state["step"] + 1, "params": params, "opt": opt}, {**metrics, **norms}


@dataclasses.dataclass(frozen=True)
class Discriminator:
  """A GAN discriminator trained beside the model with its own optimizer.

  init_params(key) -> boxed params; loss_fn(disc_params, batch, fake, step) -> (loss, metrics)
  with `fake` the model loss's generated images (gradient stopped); tx its optimizer.
  """
  init_params: Callable[..., Any]
  loss_fn: Callable[..., Any]
  tx: Any  # optax.GradientTransformation


def gan_train_step(state, batch, key, frozen, *, loss_fn, tx, disc: Discriminator):
  """One generator and one discriminator update of `state = {"step", "params", "opt",
  "disc_params", "disc_opt"}`; returns `(state, metrics)` (the discriminator's prefixed d_)."""
  step = state["step"]
  key = jax.random.fold_in(key, step)
  (metrics, fake), params, opt, norms = descend(loss_fn, tx, state["params"], state["opt"],
                                                batch, key, frozen, state["disc_params"], step)
  d_metrics, d_params, d_opt, d_norms = descend(disc.loss_fn, disc.tx, state["disc_params"],
                                                state["disc_opt"], batch,
                                                jax.lax.stop_gradient(fake), step)
  metrics = {**metrics, **norms, **d_metrics, **{f"d_{k}": v for k, v in d_norms.items()}}
  return {"step": step + 1, "params": params, "opt": opt, "disc_params": d_params,
          "disc_opt": d_opt}, metrics


class Trainer:
  """Sharded state layout, init and jitted step of one model on one mesh."""

  def __init__(self, init_params, loss_fn, tx, mesh, rules=parallel.LOGICAL_AXIS_RULES, *,
               disc: Discriminator | None = None):
    self.mesh, self.rules, self.tx, self.disc = mesh, rules, tx, disc
    self._init_params = init_params
    self.repl = parallel.replicated(mesh)
    abstract, self.state_shardings = {"step": jax.ShapeDtypeStruct((), jnp.int32)}, {
        "step": self.repl}
    for prefix, init, opt_tx in (("", init_params, tx),) + (
        (("disc_", disc.init_params, disc.tx),) if disc is not None else ()):
      with self.ctx():
        boxed = jax.eval_shape(init, jax.random.key(0))
        param_sh = parallel.logical_shardings(boxed, mesh, rules)
      abstract[prefix + "params"] = nn.unbox(boxed)
      abstract[prefix + "opt"] = jax.eval_shape(opt_tx.init, abstract[prefix + "params"])
      self.state_shardings[prefix + "params"] = param_sh
      self.state_shardings[prefix + "opt"] = parallel.opt_shardings(
          abstract[prefix + "opt"], abstract[prefix + "params"], param_sh, mesh)
    self.abstract_params = abstract["params"]
    self.abstract_state = checkpoint.abstract_like(abstract, self.state_shardings)
    self._init = parallel.Together(jax.jit(self._fresh, out_shardings=self.state_shardings),
                                   "init")
    # The jitted step: `step_fn(state, batch, key, frozen)` on global arrays (or, to lower it
    # ahead of time, `ShapeDtypeStruct`s with shardings: vlbpe_jax/aot.py).
    step = (functools.partial(train_step, loss_fn=loss_fn, tx=tx) if disc is None else
            functools.partial(gan_train_step, loss_fn=loss_fn, tx=tx, disc=disc))
    self.step_fn = parallel.Together(jax.jit(
        step, out_shardings=(self.state_shardings, self.repl), donate_argnums=(0,)), "step")

  @contextlib.contextmanager
  def ctx(self):
    with parallel.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def _fresh(self, key):
    params = nn.unbox(self._init_params(key))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": self.tx.init(params)}
    if self.disc is not None:  # its own key: the model's init is the same with or without it
      d_params = nn.unbox(self.disc.init_params(jax.random.fold_in(key, 1)))
      state.update(disc_params=d_params, disc_opt=self.disc.tx.init(d_params))
    return state

  def init(self, key):
    with self.ctx():
      return self._init(key)

  def step(self, state, batch, key, frozen=None):
    """batch: host-local numpy pytree `[B_local, ...]`; key and frozen already on the mesh."""
    with self.ctx():
      return self.step_fn(state, parallel.shard_batch(batch, self.mesh), key, frozen)
