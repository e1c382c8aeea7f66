"""V2L local quantiser: nearest projected LM-subword embedding, straight-through.

  codebook = Projector(d)(local_emb)                 # [V, E] frozen -> [V, d], trainable map
  z_q, idx, loss, aux = quantize_local(z, codebook)  # z: [B, h, w, d] encoder output

As the public code (models_v2l.py, `quantize`):
- the encoder output z is L2-normalised over d; the projected codebook is NOT normalised (its
  rows have whatever length the projector gives), and the lookup is the full squared L2
  distance |z|^2 + |e|^2 - 2 z.e, so it is not a cosine lookup;
- loss = mean(|sg(z_q) - z|^2) + beta * mean(|z_q - sg(z)|^2), beta = 0.33: the weight 1 term
  pulls the ENCODER to its code (commitment), the beta term pulls the CODEBOOK (here: the
  projector) to the encoder. taming (and vq/quantizer.py) put beta on the commitment term
  instead; V2L's placement is kept;
- z_q = sg(e) + z - sg(z): its value is exactly the codebook row e, and the decoder's gradient
  reaches the encoder unchanged.
The projector is torch's Linear(E, d) of the code (weight std E^-0.5, with a bias; zero here).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlbpe_jax.vq import quantizer as vq_quantizer

BETA = 0.33


class Projector(nn.Module):
  """Linear E -> d applied to the frozen local table: [V, E] -> [V, d] float32."""
  code_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, table):
    chex.assert_rank(table, 2)
    e = table.shape[1]
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(e ** -0.5), ("embed", "code_dim")), (e, self.code_dim),
                        self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("code_dim",)),
                      (self.code_dim,), self.param_dtype)
    out = jnp.einsum("VE,ED->VD", table.astype(self.dtype), kernel.astype(self.dtype))
    return (out + bias.astype(self.dtype)).astype(jnp.float32)


def normalize(z):
  """L2-normalises the last axis (float32)."""
  z = z.astype(jnp.float32)
  return z * jax.lax.rsqrt(jnp.sum(jnp.square(z), axis=-1, keepdims=True) + 1e-12)


def quantize_local(z, codebook, *, beta: float = BETA):
  """z: [B, h, w, d] (any scale); codebook: [V, d] projected (not normalised).

  Returns (z_q [B, h, w, d], idx int32 [B, h, w] local codebook indices, loss scalar, aux):
  aux has `z` (the normalised encoder output), `counts` [V], `usage`, `perplexity`.
  Map idx to LM ids with `lm_ids[idx]` (codebook.subword_texts).
  """
  chex.assert_rank([z, codebook], [4, 2])
  if z.shape[-1] != codebook.shape[1]:
    raise ValueError(f"encoder width {z.shape[-1]} != codebook width {codebook.shape[1]}")
  z = normalize(z)
  codebook = codebook.astype(jnp.float32)
  idx = vq_quantizer.nearest_codes(z, codebook, l2_normalize=False)  # squared L2
  e = jnp.take(codebook, idx, axis=0)  # [B, h, w, d]
  sg = jax.lax.stop_gradient
  loss = jnp.mean(jnp.square(sg(e) - z)) + beta * jnp.mean(jnp.square(e - sg(z)))
  z_q = sg(e) + (z - sg(z))  # value: exactly e
  counts = vq_quantizer.code_counts(idx, codebook.shape[0])
  return z_q, idx, loss, dict(z=z, counts=counts, usage=jnp.mean(counts > 0),
                              perplexity=vq_quantizer.perplexity(counts))
