"""Rectified flow (x0 data, eps noise, target eps - x0), sigma sampling, CFG dropout and the
Euler sampler's direction: a 1-D Gaussian toy with the exact velocity is transported exactly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlbpe_jax.dit import flow
from vlbpe_jax.dit import sampler


def test_flow_path_identities():
  ks = jax.random.split(jax.random.key(0), 2)
  x0 = jax.random.normal(ks[0], (3, 2, 2, 4))
  eps = jax.random.normal(ks[1], x0.shape)
  x_t, target = flow.flow_path(x0, eps, jnp.array([0.0, 1.0, 0.25]))
  np.testing.assert_allclose(x_t[0], x0[0])  # sigma 0: data
  np.testing.assert_allclose(x_t[1], eps[1])  # sigma 1: noise
  np.testing.assert_allclose(x_t[2], 0.75 * x0[2] + 0.25 * eps[2], rtol=1e-6)
  np.testing.assert_allclose(target, eps - x0)
  # target = d x_t / d sigma: the sampler's x += (s_next - s) * v moves along the path.
  h = 1e-2
  x_h, _ = flow.flow_path(x0, eps, jnp.array([h, 1.0, 0.25 + h]))
  np.testing.assert_allclose((x_h - x_t)[2] / h, target[2], rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(flow.flow_loss(x0, eps), np.mean((np.asarray(x0) - eps) ** 2),
                             rtol=1e-6)


def test_sample_sigma_uniform_discrete_continuous_and_shift():
  key = jax.random.key(1)
  s = np.asarray(flow.sample_sigma(key, 20_000))
  k = s * 1000
  np.testing.assert_allclose(k, np.round(k), atol=1e-3)  # levels k/1000, k = 1..1000
  assert s.min() >= 0.001 and s.max() <= 1.0 and abs(s.mean() - 0.5005) < 0.01
  c = np.asarray(flow.sample_sigma(key, 20_000, num_train_steps=0))
  assert c.min() > 0 and c.max() <= 1.0 and abs(c.mean() - 0.5) < 0.01
  assert np.abs(c * 1000 - np.round(c * 1000)).max() > 0.1
  shifted = np.asarray(flow.sample_sigma(key, 20_000, shift=3.0))
  np.testing.assert_allclose(shifted, flow.shift_sigma(s, 3.0), rtol=1e-6)
  assert shifted.mean() > s.mean() + 0.1 and np.all(shifted >= s - 1e-7)
  grid = np.linspace(0, 1, 101)
  for shift in (0.5, 3.0):
    out = flow.shift_sigma(grid, shift)
    assert np.all(np.diff(out) > 0) and out[0] == 0 and out[-1] == 1
  with pytest.raises(ValueError, match="kind='beta'"):
    flow.sample_sigma(key, 4, kind="beta")
  with pytest.raises(ValueError, match="shift=0"):
    flow.shift_sigma(grid, 0.0)


def test_sample_sigma_logit_normal():
  s = np.asarray(flow.sample_sigma(jax.random.key(2), 20_000, kind="logit_normal",
                                   logit_mean=0.5, logit_std=0.8))
  logit = np.log(s / (1 - s))
  assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
  assert abs(np.median(s) - 1 / (1 + np.exp(-0.5))) < 0.01


def test_drop_conditions_rate_and_whole_samples():
  cond = jnp.ones((20_000, 2, 3))
  out, keep = flow.drop_conditions(jax.random.key(3), cond, 0.1)
  out, keep = np.asarray(out), np.asarray(keep)
  assert abs((~keep).mean() - 0.1) < 0.01
  np.testing.assert_array_equal(out[~keep], 0.0)
  np.testing.assert_array_equal(out[keep], 1.0)
  assert np.asarray(flow.drop_conditions(jax.random.key(3), cond, 0.0)[1]).all()
  assert not np.asarray(flow.drop_conditions(jax.random.key(3), cond, 1.0)[1]).any()
  with pytest.raises(ValueError, match="p=1.5"):
    flow.drop_conditions(jax.random.key(3), cond, 1.5)


def _gaussian_velocity(mu, s):
  """Exact v(x_t, sigma) = E[eps - x0 | x_t] for x0 ~ N(mu, s^2), eps ~ N(0, 1)."""

  def fn(x, t, cond, cond_mask):
    sig = (t / 1000.0)[:, None, None, None]
    var = (1 - sig) ** 2 * s ** 2 + sig ** 2
    return (sig - (1 - sig) * s ** 2) / var * (x - (1 - sig) * mu) - mu

  return fn


def _cond(b):
  return dict(cond=jnp.zeros((b, 1, 1)), cond_mask=jnp.ones((b, 1), bool))


def test_euler_transports_noise_to_the_data_gaussian():
  mu, s, b = 2.0, 0.5, 4096
  key = jax.random.key(4)
  sample = jax.jit(functools.partial(sampler.euler_sample, _gaussian_velocity(mu, s), key,
                                     (b, 1, 1, 1), steps=1000, guidance=1.0))
  x = np.asarray(sample(**_cond(b))).ravel()
  z = np.asarray(jax.random.normal(key, (b, 1, 1, 1))).ravel()
  # The exact flow map of this Gaussian path is z -> mu + s * z (monotone, linear).
  np.testing.assert_allclose(x, mu + s * z, atol=5e-3)
  assert abs(x.mean() - mu) < 0.03 and abs(x.std() - s) < 0.02


def test_euler_hits_a_point_mass_exactly():
  b = 8
  x = sampler.euler_sample(_gaussian_velocity(-1.5, 0.0), jax.random.key(5), (b, 1, 1, 1),
                           steps=3, guidance=1.0, **_cond(b))
  np.testing.assert_allclose(x, -1.5, atol=1e-5)


def test_sigma_schedule():
  s = sampler.sigma_schedule(30)
  assert s.shape == (31,) and s[0] == 1.0 and s[-1] == 0.0
  np.testing.assert_allclose(s[-2], 1 / 30, rtol=1e-6)
  np.testing.assert_allclose(sampler.sigma_schedule(4, shift=3.0)[:-1],
                             flow.shift_sigma(np.linspace(1, 0.25, 4), 3.0), rtol=1e-6)
  with pytest.raises(ValueError, match="steps=0"):
    sampler.sigma_schedule(0)


def test_cfg_is_one_batched_call_and_combines_branches():
  calls = []

  def fn(x, t, cond, cond_mask):
    calls.append(x.shape[0])
    return x * 0.5 + cond.sum(axis=(1, 2))[:, None, None, None] + t[:, None, None, None] / 1e3

  b = 3
  x = jax.random.normal(jax.random.key(6), (b, 2, 2, 1))
  t = jnp.full((b,), 500.0)
  cond = jax.random.normal(jax.random.key(7), (b, 4, 2))
  mask = jnp.ones((b, 4), bool)
  v = sampler.guided_velocity(fn, x, t, cond, mask, 3.0)
  assert calls == [2 * b]
  v_c, v_u = fn(x, t, cond, mask), fn(x, t, jnp.zeros_like(cond), mask)
  np.testing.assert_allclose(v, v_u + 3.0 * (v_c - v_u), rtol=1e-5, atol=1e-6)
  calls.clear()
  np.testing.assert_allclose(sampler.guided_velocity(fn, x, t, cond, mask, 1.0), v_c)
  assert calls == [b]
  # One Euler step (sigma 1 -> 0) under jit equals the formula.
  out = jax.jit(functools.partial(sampler.euler_sample, fn, steps=1, guidance=3.0),
                static_argnums=(1,))(jax.random.key(8), (b, 2, 2, 1), cond=cond, cond_mask=mask)
  z = jax.random.normal(jax.random.key(8), (b, 2, 2, 1))
  t1 = jnp.full((b,), 1000.0)
  want = z - (fn(z, t1, jnp.zeros_like(cond), mask) +
              3.0 * (fn(z, t1, cond, mask) - fn(z, t1, jnp.zeros_like(cond), mask)))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="batch"):
    sampler.euler_sample(fn, jax.random.key(8), (b + 1, 2, 2, 1), cond=cond, cond_mask=mask)
