"""Image and codebook metrics: PSNR, SSIM (Wang et al. 2004), codebook usage, perplexity,
codes per flat region.

Images are float in [0, max_val], [B, H, W, C]; metrics are per image `[B]` unless noted.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vlbpe_jax.vq import quantizer


def psnr(x, y, max_val: float = 1.0):
  """Peak signal-to-noise ratio in dB per image: [B]."""
  chex.assert_equal_shape([x, y])
  mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(max_val ** 2 / jnp.maximum(mse, 1e-10))


def psnr_db(images, recon) -> float:
  """Mean PSNR (dB) of uint8 image pairs [N, R, R, 3]."""
  return float(np.mean(psnr(jnp.asarray(images) / 255.0, jnp.asarray(recon) / 255.0)))


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


def flat_region_codes(images, codes, *, min_cells: int = 20) -> dict:
  """How consistently flat regions are coded: one code per constant colour is the ideal.

  images: uint8 [N, H, W, 3]; codes: int [N, h, w] with H = f*h. A cell is *flat* when the
  3x3 neighbourhood of f x f pixel patches around it (not touching the border) is one exact
  colour. Returns {colour (r, g, b): {"cells", "codes" (distinct), "top_share" (share of the
  most common code)}} over the colours with at least `min_cells` flat cells (numpy, on host).
  """
  images, codes = np.asarray(images), np.asarray(codes)
  if images.ndim != 4 or images.shape[-1] != 3 or codes.ndim != 3:
    raise ValueError(f"images {images.shape} / codes {codes.shape}: expected [N, H, W, 3] and "
                     "[N, h, w]")
  n, hh, ww, _ = images.shape
  if codes.shape[0] != n or hh % codes.shape[1] or ww % codes.shape[2] or (
      hh // codes.shape[1] != ww // codes.shape[2]):
    raise ValueError(f"codes {codes.shape} do not tile images {images.shape}: expected "
                     "[N, H/f, W/f]")
  h, w = codes.shape[1:]
  f = hh // h
  patches = images.reshape(n, h, f, w, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, -1, 3)
  uniform = np.all(patches == patches[:, :, :, :1], axis=(3, 4))  # [N, h, w]
  colour = patches[:, :, :, 0].astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])  # [N, h, w]
  flat = np.ones((n, h - 2, w - 2), bool)
  centre = colour[:, 1:-1, 1:-1]
  for dy in range(3):
    for dx in range(3):
      flat &= uniform[:, dy:dy + h - 2, dx:dx + w - 2]
      flat &= colour[:, dy:dy + h - 2, dx:dx + w - 2] == centre
  out = {}
  inner_codes = codes[:, 1:-1, 1:-1]
  for c in np.unique(centre[flat]):
    cs = inner_codes[flat & (centre == c)]
    if cs.size < min_cells:
      continue
    counts = np.bincount(cs - cs.min())
    out[(int(c) >> 16, (int(c) >> 8) & 255, int(c) & 255)] = dict(
        cells=int(cs.size), codes=int(np.count_nonzero(counts)),
        top_share=float(counts.max() / cs.size))
  return out
