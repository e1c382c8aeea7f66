"""Euler sampler for the rectified flow of flow.py, with classifier-free guidance (BLIP3-o).

  sigmas = shift_sigma(linspace(1, 1/steps, steps), shift) ++ [0]
  x <- N(0, I)                                  (sigma = 1 is pure noise)
  x <- x + (sigma_next - sigma) * v(x, sigma * 1000)     for each step; v predicts eps - x0
  v = v_u + guidance * (v_c - v_u),   v_u: the condition zeroed (same mask)

Both guidance branches run in one call on a doubled batch; guidance=1.0 skips the
unconditional branch. Several samples per prompt: repeat the condition, e.g.
`cond = jnp.repeat(cond, n, axis=0)` (and its mask), with `shape[0] = B * n`.
`steps`, `guidance` and `shift` are Python numbers (static under jit):

  sample = jax.jit(functools.partial(euler_sample, fn, steps=30, guidance=3.0))
  x = sample(key, (b, 8, 8, c), cond=cond, cond_mask=mask)   # shape static: bind it or use
                                                             # static_argnums
BLIP3-o passes the timestep to the DiT cast to an integer (`sigma * 1000` truncated); we pass
the float `sigma * 1000`, as in training.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vlbpe_jax.dit import flow


def sigma_schedule(steps, shift=1.0):
  """[steps + 1] float32: linspace(1, 1/steps, steps), shifted, then 0 (numpy, static)."""
  if steps < 1:
    raise ValueError(f"steps={steps}: expected >= 1")
  s = np.linspace(1.0, 1.0 / steps, steps)
  s = s if shift == 1.0 else flow.shift_sigma(s, shift)
  return np.append(s, 0.0).astype(np.float32)


def guided_velocity(velocity_fn, x, t, cond, cond_mask, guidance):
  """v_u + guidance * (v_c - v_u) from one call on [x; x] with [zeros; cond]."""
  if guidance == 1.0:
    return velocity_fn(x, t, cond, cond_mask)
  v = velocity_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                  jnp.concatenate([jnp.zeros_like(cond), cond]),
                  jnp.concatenate([cond_mask, cond_mask]))
  v_u, v_c = jnp.split(v, 2)
  return v_u + guidance * (v_c - v_u)


def euler_sample(velocity_fn, key, shape, *, cond, cond_mask, steps=30, guidance=3.0, shift=1.0):
  """Samples x at sigma = 0.

  velocity_fn(x [B, ...], t [B] float (sigma * 1000), cond [B, Q, E], cond_mask [B, Q]) -> v.
  shape: (B, H, W, C) with B = cond.shape[0]. Returns [B, H, W, C] float32.
  """
  chex.assert_rank([cond, cond_mask], [3, 2])
  if shape[0] != cond.shape[0]:
    raise ValueError(f"shape={tuple(shape)}: batch must equal cond's {cond.shape[0]} rows "
                     "(repeat cond for several samples per prompt)")
  sigmas = jnp.asarray(sigma_schedule(steps, shift))
  b = shape[0]

  def step(x, pair):
    s, s_next = pair[0], pair[1]
    t = jnp.full((b,), s * 1000.0, jnp.float32)
    v = guided_velocity(velocity_fn, x, t, cond, cond_mask, guidance)
    return (x + (s_next - s) * v.astype(jnp.float32)), None

  x = jax.random.normal(key, shape, jnp.float32)
  x, _ = jax.lax.scan(step, x, jnp.stack([sigmas[:-1], sigmas[1:]], axis=-1))
  return x
