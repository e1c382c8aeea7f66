"""Llama building blocks: RMSNorm, rotary position embedding (1D and 2D), SwiGLU MLP.

RoPE follows Hugging Face's rotate-half convention: the head dim K is split into halves
`[x1, x2]` that rotate together, `x * cos + concat(-x2, x1) * sin`, with
`inv_freq[j] = theta ** (-2j / K)` (optionally rescaled as in Llama 3.1).
"""

import math

import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np


class RMSNorm(nn.Module):
  """`x / rms(x) * scale`, computed in float32. `x: [..., D]`."""
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
    return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


def rope_inv_freq(dim, theta, scaling=None):
  """Inverse frequencies `[dim // 2]` float32 (numpy, static).

  `scaling = (factor, low_freq_factor, high_freq_factor, original_max_position)` applies
  Llama 3.1's rescaling: long wavelengths are divided by `factor`, short ones kept, the band
  between them interpolated.
  """
  inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if scaling is not None:
    factor, low, high, old_len = scaling
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = np.where(wavelen > old_len / low, inv_freq / factor,
                        np.where(wavelen < old_len / high, inv_freq, mid))
  return inv_freq.astype(np.float32)


def rope_angles(positions, head_dim, theta, scaling=None):
  """Returns `(cos, sin)`, each `[B, T, K]` float32.

  positions: `[B, T]` int (1D RoPE) or `[B, T, 2]` int (2D RoPE: (row, col) per token). In 2D,
  the rotary pairs keep the 1D frequency ladder and alternate between the axes (pair j turns
  with the row for even j, the column for odd j, as in interleaved M-RoPE), so a token at
  `(p, p)` gets exactly the 1D rotation of position p: text laid on the diagonal reads as a
  pretrained 1D model expects, while image tokens carry their grid offsets.
  """
  inv = jnp.asarray(rope_inv_freq(head_dim, theta, scaling))  # [K/2]
  if positions.ndim == 2:
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B, T, K/2]
  elif positions.ndim == 3 and positions.shape[-1] == 2:
    axis = np.arange(head_dim // 2) % 2  # 0: row, 1: column
    ang = positions.astype(jnp.float32)[..., axis] * inv  # [B, T, K/2]
  else:
    raise ValueError(f"positions shape {positions.shape}: expected [B, T] or [B, T, 2]")
  ang = jnp.concatenate([ang, ang], axis=-1)  # [B, T, K]
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
  """x: `[B, T, N, K]`; cos, sin: `[B, T, K]`. Rotate-half RoPE in float32."""
  chex.assert_rank(x, 4)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rot = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos[:, :, None] + rot * sin[:, :, None]).astype(x.dtype)


class Mlp(nn.Module):
  """SwiGLU: `down(silu(gate(x)) * up(x))`. x: `[B, T, D]`."""
  mlp_dim: int
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(self.init_std)

    def dense(features, axes, name):
      return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.with_logical_partitioning(init, axes), name=name)

    gate = dense(self.mlp_dim, ("embed", "mlp"), "gate")(x)  # [B, T, F]
    up = dense(self.mlp_dim, ("embed", "mlp"), "up")(x)  # [B, T, F]
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("act_batch", "act_len", "act_mlp"))
    return dense(x.shape[-1], ("mlp", "embed"), "down")(h)  # [B, T, D]
