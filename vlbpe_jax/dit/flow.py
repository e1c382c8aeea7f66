"""Rectified flow as BLIP3-o trains it (x0 = data, eps = noise, sigma = noise level).

  x_t = (1 - sigma) * x0 + sigma * eps,   target v = eps - x0,   loss = mean((v_pred - v)^2)

The DiT is given `sigma * 1000`. Sampling runs from sigma = 1 (pure noise) down to 0 (data):
`x <- x + (sigma_next - sigma) * v` (sampler.py).

  k_sigma, k_noise, k_drop = jax.random.split(key, 3)
  sigma = sample_sigma(k_sigma, b)                                         # [B] in (0, 1]
  x_t, target = flow_path(x0, jax.random.normal(k_noise, x0.shape), sigma)
  cond, keep = drop_conditions(k_drop, cond, 0.1)
  loss = flow_loss(model.apply(params, x_t, sigma * 1000, cond, mask), target)
"""

import chex
import jax
import jax.numpy as jnp

SIGMA_KINDS = ("uniform", "logit_normal")


def shift_sigma(sigma, shift):
  """Timestep shift `shift * s / (1 + (shift - 1) * s)`: shift > 1 moves mass to high noise."""
  if shift <= 0:
    raise ValueError(f"shift={shift}: expected > 0")
  return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_sigma(key, n, *, kind="uniform", shift=1.0, num_train_steps=1000, logit_mean=0.0,
                 logit_std=1.0):
  """Noise levels `[n]` float32 in (0, 1], then shifted by `shift_sigma`.

  kind="uniform": with num_train_steps=N > 0, one of N discrete levels k/N, k = 1..N, each with
  probability 1/N (BLIP3-o: u ~ U(0,1), index floor(u*1000) into the scheduler's 1000..1
  timesteps); with num_train_steps=0, continuous on (0, 1]. kind="logit_normal":
  sigmoid(N(logit_mean, logit_std^2)) (SD3), continuous.
  """
  if kind not in SIGMA_KINDS:
    raise ValueError(f"sigma kind={kind!r} unknown; expected one of {SIGMA_KINDS}")
  if num_train_steps < 0:
    raise ValueError(f"num_train_steps={num_train_steps}: expected >= 0 (0 = continuous)")
  if kind == "uniform" and num_train_steps > 0:
    k = jax.random.randint(key, (n,), 1, num_train_steps + 1)
    sigma = k.astype(jnp.float32) / num_train_steps
  elif kind == "uniform":
    sigma = 1.0 - jax.random.uniform(key, (n,))  # (0, 1]
  else:
    sigma = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (n,)))
  return sigma if shift == 1.0 else shift_sigma(sigma, shift)


def flow_path(x0, eps, sigma):
  """x0 data, eps noise: [B, ...] float; sigma: [B]. Returns (x_t, target = eps - x0)."""
  chex.assert_equal_shape([x0, eps])
  chex.assert_shape(sigma, (x0.shape[0],))
  s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)  # [B, 1, ...]
  return (1.0 - s) * x0 + s * eps, eps - x0


def drop_conditions(key, cond, p):
  """Zeroes whole samples of cond ([B, ...]) with probability p (classifier-free guidance).

  Returns (cond, keep) with keep: [B] bool (False = dropped, unconditional).
  """
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"condition drop probability p={p}: expected in [0, 1]")
  keep = jax.random.uniform(key, (cond.shape[0],)) >= p
  mask = keep.reshape((-1,) + (1,) * (cond.ndim - 1))
  return jnp.where(mask, cond, jnp.zeros_like(cond)), keep


def flow_loss(pred, target):
  """Mean squared error over everything (float32): pred, target [B, ...]."""
  chex.assert_equal_shape([pred, target])
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))
