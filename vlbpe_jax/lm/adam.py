"""Adam with a step count per leaf (per layer slice of a scanned stack), for staged training.

`optax.scale_by_adam` holds one count for every leaf it updates. After a stage change one
partition mixes leaves that trained n steps with leaves that never did, and no single count
serves both: with n, fresh zero moments get the wrong bias correction (a step of
(1 - b1) / (1 - b1^(n+1)) * sqrt((1 - b2^(n+1)) / (1 - b2)) times a fresh one, 3.2x at b2=0.999);
with 0, carried moments are divided by (1 - b1) and (1 - b2) as if they held one gradient (up to
2.2x a fresh step at b2=0.95). Here every leaf keeps its own count, so a carried leaf continues
exactly where it was and a new one takes an ordinary first step (`stages.migrate_opt_state`).

  tx = optax.chain(scale_by_adam(0.9, 0.95, stacked=lambda path: path[0].key == "layers"), ...)

Same update as `optax.scale_by_adam` (no eps_root, no Nesterov) when all counts are equal.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class ScaleByAdamState(NamedTuple):
  """count: per leaf int32 `[]`, or `[L, 1, ..., 1]` for a stacked leaf; mu, nu: like params."""
  count: Any
  mu: Any
  nu: Any


def scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, *, stacked=lambda path: False):
  """Adam's moment scaling. `stacked(path)`: the leaf at `path` has a leading layer axis whose
  slices count their steps separately. Params may be `nn.Partitioned`-boxed at init (the moments
  are boxed like them, the counts are plain arrays)."""

  def count_like(path, x):
    x = nn.unbox(x)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1) if stacked(path) else ()
    return jnp.zeros(shape, jnp.int32)

  def init(params):
    count = jax.tree_util.tree_map_with_path(
        count_like, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return ScaleByAdamState(count=count, mu=jax.tree.map(jnp.zeros_like, params),
                            nu=jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
    nu = jax.tree.map(lambda g, v: (1 - b2) * jnp.square(g) + b2 * v, updates, state.nu)
    count = jax.tree.map(optax.safe_increment, state.count)

    def scale(m, v, n):
      m_hat = m / (1 - b1 ** n).astype(m.dtype)
      v_hat = v / (1 - b2 ** n).astype(v.dtype)
      return m_hat / (jnp.sqrt(v_hat) + eps)

    updates = jax.tree.map(scale, mu, nu, count)
    return updates, ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)
