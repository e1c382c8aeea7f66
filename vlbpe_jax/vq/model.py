"""VQModel: encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder (taming layout).

Images enter and leave as float32 in [-1, 1], [B, H, W, 3]. `__call__` is the training path;
`encode` and `decode` are its two halves and meet at the same code vectors, so
`decode(encode(x)) == __call__(x)[0]` exactly.
"""

import chex
import flax.linen as nn
import jax.numpy as jnp

from vlbpe_jax.vq import autoencoder
from vlbpe_jax.vq import layers
from vlbpe_jax.vq import quantizer


class VQModel(nn.Module):
  """Sizes from `autoencoder.VARIANTS[variant]`; codebook `[codebook_size, code_dim]`."""
  variant: str = "tiny"
  codebook_size: int = 512
  code_dim: int = 16
  beta: float = 0.25
  l2_normalize: bool = True
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    sizes = autoencoder.decode_variant(self.variant)
    self.encoder = autoencoder.Encoder(dtype=self.dtype, **sizes)
    self.decoder = autoencoder.Decoder(dtype=self.dtype, **{
        k: v for k, v in sizes.items() if k not in autoencoder.ENCODER_ONLY})
    self.quant_conv = layers.conv(self.code_dim, 1, dtype=self.dtype)
    self.post_quant_conv = layers.conv(sizes["z_channels"], 1, dtype=self.dtype)
    self.quantize = quantizer.VectorQuantizer(
        self.codebook_size, self.code_dim, self.beta, self.l2_normalize)

  @property
  def downsample(self) -> int:
    return autoencoder.downsample_factor(self.variant)

  def encode_latent(self, x):
    """x: [B, H, W, 3] float in [-1, 1] -> z_e [B, H/f, W/f, code_dim] float32."""
    chex.assert_rank(x, 4)
    chex.assert_axis_dimension(x, -1, 3)
    return self.quant_conv(self.encoder(x)).astype(jnp.float32)

  def decode_vectors(self, z_q):
    """z_q: [B, h, w, code_dim] -> image [B, h*f, w*f, 3] float32 (unclipped)."""
    return self.decoder(self.post_quant_conv(z_q.astype(self.dtype)))

  def __call__(self, x):
    """Training path. Returns (x_rec, aux): aux has z_e, codes, quant_loss, counts, usage,
    perplexity."""
    z_e = self.encode_latent(x)
    z_q, codes, quant_loss, aux = self.quantize(z_e)
    x_rec = self.decode_vectors(z_q)
    return x_rec, dict(aux, z_e=z_e, codes=codes, quant_loss=quant_loss)

  def encode(self, x):
    """x: [B, H, W, 3] in [-1, 1] -> int32 codes [B, H/f, W/f]."""
    return quantizer.nearest_codes(self.encode_latent(x), self.quantize.embedding,
                                   self.l2_normalize)

  def decode(self, codes):
    """int32 codes [B, h, w] -> image [B, h*f, w*f, 3] float32 (unclipped)."""
    chex.assert_rank(codes, 3)
    return self.decode_vectors(self.quantize.codes_to_vectors(codes))
