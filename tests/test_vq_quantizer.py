"""Vector quantizer: lookup vs numpy, straight-through gradients, losses, dead-code restart."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlbpe_jax.vq import metrics
from vlbpe_jax.vq import quantizer


def _np_nearest(z, book, l2):
  if l2:
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    book = book / np.linalg.norm(book, axis=-1, keepdims=True)
  d = ((z[..., None, :] - book) ** 2).sum(-1)
  return d.argmin(-1)


@pytest.mark.parametrize("l2", [False, True])
def test_codes_and_loss_match_numpy(l2):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  book = rng.normal(size=(7, 5)).astype(np.float32)
  z_q, codes, loss, aux = quantizer.quantize(jnp.asarray(z), jnp.asarray(book), beta=0.25,
                                             l2_normalize=l2)
  want = _np_nearest(z, book, l2)
  np.testing.assert_array_equal(np.asarray(codes), want)
  assert codes.dtype == jnp.int32
  table = book / np.linalg.norm(book, axis=-1, keepdims=True) if l2 else book
  zz = z / np.linalg.norm(z, axis=-1, keepdims=True) if l2 else z
  np.testing.assert_allclose(np.asarray(z_q), table[want], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(loss), 1.25 * np.mean((zz - table[want]) ** 2), rtol=1e-5)
  counts = np.bincount(want.reshape(-1), minlength=7)
  np.testing.assert_array_equal(np.asarray(aux["counts"]), counts)
  p = counts[counts > 0] / counts.sum()
  np.testing.assert_allclose(float(aux["perplexity"]), np.exp(-(p * np.log(p)).sum()), rtol=1e-5)
  assert float(aux["usage"]) == pytest.approx(np.mean(counts > 0))


def test_straight_through_gradients():
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.normal(size=(1, 2, 2, 3)), jnp.float32)
  book = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 2, 2, 3)), jnp.float32)

  def downstream(z, book):  # a "decoder" reading z_q linearly; quantizer loss excluded
    z_q, _, _, _ = quantizer.quantize(z, book, beta=0.25)
    return jnp.sum(w * z_q)

  g_z, g_book = jax.grad(downstream, argnums=(0, 1))(z, book)
  np.testing.assert_allclose(np.asarray(g_z), np.asarray(w))  # identity through the lookup
  np.testing.assert_array_equal(np.asarray(g_book), 0.0)  # decoder does not move the codebook

  def qloss(z, book):
    return quantizer.quantize(z, book, beta=0.25)[2]

  g_z, g_book = jax.grad(qloss, argnums=(0, 1))(z, book)
  codes = np.asarray(quantizer.nearest_codes(z, book, False))
  e = np.asarray(book)[codes]
  n = z.size
  np.testing.assert_allclose(np.asarray(g_z), 0.25 * 2 * (np.asarray(z) - e) / n, rtol=1e-5)
  want_book = np.zeros_like(np.asarray(book))
  np.add.at(want_book, codes.reshape(-1), (2 * (e - np.asarray(z)) / n).reshape(-1, 3))
  np.testing.assert_allclose(np.asarray(g_book), want_book, rtol=1e-5, atol=1e-7)


def test_restart_dead_codes_reseeds_only_dead_rows():
  rng = np.random.default_rng(2)
  book = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  usage = jnp.asarray([0.5, 0.0, 0.3, 0.001, 0.199, 0.0], jnp.float32)
  z = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32) + 100.0  # far from every code
  new_book, new_usage, n = quantizer.restart_dead_codes(book, usage, z, jax.random.key(0),
                                                        threshold=0.1)
  dead = np.asarray(usage) < 0.1 / 6
  assert int(n) == dead.sum() == 3
  np.testing.assert_array_equal(np.asarray(new_book)[~dead], np.asarray(book)[~dead])
  for row in np.asarray(new_book)[dead]:
    assert any(np.array_equal(row, zi) for zi in np.asarray(z))  # copied from encoder outputs
  np.testing.assert_allclose(np.asarray(new_usage)[dead], 2 * 0.1 / 6)
  np.testing.assert_array_equal(np.asarray(new_usage)[~dead], np.asarray(usage)[~dead])
  # Restarted codes now win the lookup for those encoder outputs.
  assert set(np.asarray(quantizer.nearest_codes(z, new_book, False))) <= set(np.flatnonzero(dead))
  same, _, _ = quantizer.restart_dead_codes(book, usage, z, jax.random.key(0), threshold=0.1)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(new_book))  # same key, same result


def test_usage_and_perplexity_metrics():
  codes = jnp.asarray([[0, 1], [1, 3]])
  assert float(metrics.codebook_usage(codes, 8)) == pytest.approx(3 / 8)
  assert float(metrics.code_perplexity(jnp.arange(8), 8)) == pytest.approx(8.0, rel=1e-5)
  assert float(metrics.code_perplexity(jnp.zeros(5, jnp.int32), 8)) == pytest.approx(1.0)


def test_restart_draws_where_weights_point_and_error_is_exact():
  book = jnp.zeros((4, 2)).at[0].set(jnp.asarray([1.0, 0.0]))
  usage = jnp.asarray([1.0, 0.0, 0.0, 0.0])
  z = jnp.asarray([[1.0, 0.0], [0.0, 5.0], [1.0, 0.1]])
  err = quantizer.quantization_error(z, book[:1], False)
  np.testing.assert_allclose(np.asarray(err), [0.0, 26.0, 0.01], rtol=1e-5)
  weights = jnp.asarray([0.0, 1.0, 0.0])
  new_book, _, n = quantizer.restart_dead_codes(book, usage, z, jax.random.key(3),
                                                threshold=0.5, weights=weights)
  assert int(n) == 3
  np.testing.assert_array_equal(np.asarray(new_book)[1:], [[0.0, 5.0]] * 3)
  np.testing.assert_array_equal(np.asarray(new_book)[0], [1.0, 0.0])
