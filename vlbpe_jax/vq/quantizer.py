"""Vector quantizer: nearest codebook entry, straight-through gradients, dead-code restart.

  z_q, codes, loss, aux = quantize(z, codebook, beta=0.25, l2_normalize=True)

loss = |sg(z) - e|^2 (codebook) + beta * |z - sg(e)|^2 (commitment). The decoder reads
z_q = sg(e) + z - sg(z): its value is exactly e, the vector `decode(codes)` reads, and the
decoder's gradient reaches the encoder unchanged (straight-through).

With `l2_normalize` (V2L, ViT-VQGAN) both z and the codebook are projected onto the unit
sphere before the lookup, so the distance is the cosine distance and z_q is a unit vector.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp


def _normalize(x):
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)


def lookup_table(codebook, l2_normalize: bool):
  """The vectors the decoder reads for each code: [V, D]."""
  codebook = codebook.astype(jnp.float32)
  return _normalize(codebook) if l2_normalize else codebook


def nearest_codes(z, codebook, l2_normalize: bool):
  """z: [..., D] -> int32 codes [...] of the nearest (cosine if normalised) entry."""
  table = lookup_table(codebook, l2_normalize)
  z = z.astype(jnp.float32)
  z = _normalize(z) if l2_normalize else z
  dist = (jnp.sum(jnp.square(table), axis=-1)
          - 2.0 * jnp.einsum("...D,VD->...V", z, table))  # |z|^2 dropped: constant per row
  return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def quantization_error(z, codebook, l2_normalize: bool):
  """z: [..., D] -> squared distance to its nearest code [...] (on the sphere if l2)."""
  z = z.astype(jnp.float32)
  z = _normalize(z) if l2_normalize else z
  e = jnp.take(lookup_table(codebook, l2_normalize), nearest_codes(z, codebook, l2_normalize),
               axis=0)
  return jnp.sum(jnp.square(z - e), axis=-1)


def quantize(z, codebook, *, beta: float = 0.25, l2_normalize: bool = False):
  """z: [B, H, W, D]; codebook: [V, D]. Returns (z_q [B, H, W, D], codes [B, H, W], loss, aux).

  aux: `counts` [V] (positions per code in this batch), `usage` (fraction of codes hit),
  `perplexity` (exp of the code-distribution entropy).
  """
  chex.assert_rank(z, 4)
  chex.assert_rank(codebook, 2)
  chex.assert_axis_dimension(z, -1, codebook.shape[1])
  z = z.astype(jnp.float32)
  z = _normalize(z) if l2_normalize else z
  codes = nearest_codes(z, codebook, l2_normalize)
  e = jnp.take(lookup_table(codebook, l2_normalize), codes, axis=0)  # [B, H, W, D]
  codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - e))
  commit_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))
  z_q = jax.lax.stop_gradient(e) + (z - jax.lax.stop_gradient(z))  # value: exactly e
  counts = code_counts(codes, codebook.shape[0])
  return z_q, codes, codebook_loss + beta * commit_loss, dict(
      counts=counts, usage=jnp.mean(counts > 0), perplexity=perplexity(counts))


def code_counts(codes, codebook_size: int):
  """int codes [...] -> float32 [V] number of positions per code."""
  return jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)


def perplexity(counts):
  """exp(entropy) of the distribution `counts / sum(counts)`; V when all codes are equal."""
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def restart_dead_codes(codebook, usage, z, key, *, threshold: float, weights=None):
  """Re-seeds codes whose usage fell below `threshold` / V with encoder outputs.

  codebook: [V, D]; usage: [V] running share of positions per code (sums to ~1);
  z: [N, D] encoder outputs of the current batch; key: PRNG key; weights: optional [N]
  sampling weights (e.g. each output's quantisation error, so that new codes go where the
  codebook fits worst); uniform when None.
  Returns (codebook, usage, n_restarted): restarted rows get twice the threshold share, so a
  restarted code that stays unused is restarted again after a while.
  """
  chex.assert_rank([codebook, usage, z], [2, 1, 2])
  v = codebook.shape[0]
  dead = usage < threshold / v  # [V]
  if weights is None:
    rows = jax.random.randint(key, (v,), 0, z.shape[0])
  else:
    chex.assert_shape(weights, (z.shape[0],))
    logits = jnp.log(jnp.maximum(weights.astype(jnp.float32), 1e-30))
    rows = jax.random.categorical(key, logits, shape=(v,))
  fresh = jnp.take(z.astype(codebook.dtype), rows, axis=0)  # [V, D]
  codebook = jnp.where(dead[:, None], fresh, codebook)
  usage = jnp.where(dead, 2.0 * threshold / v, usage)
  return codebook, usage, jnp.sum(dead.astype(jnp.int32))


class VectorQuantizer(nn.Module):
  """Holds the codebook `embedding` [V, D] (taming name) and calls `quantize`."""
  codebook_size: int
  code_dim: int
  beta: float = 0.25
  l2_normalize: bool = False

  def setup(self):
    v = self.codebook_size
    init = (nn.initializers.normal(1.0) if self.l2_normalize else  # taming: U(-1/V, 1/V)
            lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1 / v, 1 / v))
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(init, ("codebook", "code_dim")),
        (self.codebook_size, self.code_dim), jnp.float32)

  def __call__(self, z):
    return quantize(z, self.embedding, beta=self.beta, l2_normalize=self.l2_normalize)

  def codes_to_vectors(self, codes):
    """int32 codes [B, h, w] -> [B, h, w, D] exactly as `__call__` feeds the decoder."""
    return jnp.take(lookup_table(self.embedding, self.l2_normalize), codes, axis=0)
