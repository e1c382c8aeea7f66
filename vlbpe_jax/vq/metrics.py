"""Image and codebook metrics: PSNR, SSIM (Wang et al. 2004), codebook usage, perplexity.

Images are float in [0, max_val], [B, H, W, C]; metrics are per image `[B]` unless noted.
"""

import chex
import jax
import jax.numpy as jnp

from vlbpe_jax.vq import quantizer


def psnr(x, y, max_val: float = 1.0):
  """Peak signal-to-noise ratio in dB per image: [B]."""
  chex.assert_equal_shape([x, y])
  mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(max_val ** 2 / jnp.maximum(mse, 1e-10))


def _gaussian_filter(x, size: int, sigma: float):
  """'valid' separable Gaussian blur of every channel: [B, H, W, C] -> [B, H-s+1, W-s+1, C]."""
  t = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  g = jnp.exp(-0.5 * jnp.square(t / sigma))
  g = g / jnp.sum(g)
  c = x.shape[-1]
  dn = ("NHWC", "HWIO", "NHWC")
  kh = jnp.tile(g[:, None, None, None], (1, 1, 1, c))  # [s, 1, 1, C]
  kw = jnp.tile(g[None, :, None, None], (1, 1, 1, c))  # [1, s, 1, C]
  x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", dimension_numbers=dn,
                                   feature_group_count=c)
  return jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", dimension_numbers=dn,
                                      feature_group_count=c)


def ssim(x, y, max_val: float = 1.0, size: int = 11, sigma: float = 1.5):
  """Mean structural similarity per image (11x11 Gaussian window, k1=0.01, k2=0.03): [B]."""
  chex.assert_equal_shape([x, y])
  chex.assert_rank(x, 4)
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
  mu_x, mu_y = _gaussian_filter(x, size, sigma), _gaussian_filter(y, size, sigma)
  var_x = _gaussian_filter(x * x, size, sigma) - mu_x ** 2
  var_y = _gaussian_filter(y * y, size, sigma) - mu_y ** 2
  cov = _gaussian_filter(x * y, size, sigma) - mu_x * mu_y
  s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
      (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def codebook_usage(codes, codebook_size: int):
  """Fraction of the codebook that occurs at least once in `codes` (any shape): scalar."""
  return jnp.mean(quantizer.code_counts(codes, codebook_size) > 0)


def code_perplexity(codes, codebook_size: int):
  """exp(entropy) of the code distribution in `codes`: scalar in [1, V]."""
  return quantizer.perplexity(quantizer.code_counts(codes, codebook_size))
