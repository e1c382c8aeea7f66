"""DiT inputs: patches, timestep frequencies, 2D RoPE angles, and a Dense with logical names.

Patch layout: a patch's features are ordered (row in patch, column in patch, channel), the
inverse of `unpatchify`. Lumina's `LuminaPatchEmbed` orders its *input* features (channel, row,
column) and its output (row, column, channel); hf.py permutes the patch-embedding columns.

2D RoPE layout (head dim K, K % 4 == 0): rotate-half pairs `(j, j + K/2)`, j < K/2, as in
`lm/layers.apply_rope`; pairs `j < K/4` turn with the token's row at frequency
`theta ** (-4j / K)`, pairs `j >= K/4` with its column at `theta ** (-4(j - K/4) / K)`.
Lumina (`get_2d_rotary_pos_embed_lumina`) has the same frequencies but interleaves: complex pair
m = dims (2m, 2m+1) turns with the row for even m, the column for odd m, at index m // 2. The
two differ by a fixed permutation of q/k head dims (`lumina_head_perm`), applied on import.
"""

import math

import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlbpe_jax.lm import layers


def dense(features, axes, name, *, zero=False, use_bias=True, dtype=jnp.float32,
          param_dtype=jnp.float32):
  """nn.Dense whose kernel (`[in, out]`, logical `axes`) and bias carry logical names."""
  init = nn.initializers.zeros if zero else nn.initializers.xavier_uniform()
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
                  name=name)


def patchify(x, p):
  """x: [B, H, W, C] -> [B, H/p, W/p, p*p*C] (features ordered row, column, channel)."""
  chex.assert_rank(x, 4)
  b, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(f"x grid {h}x{w} is not divisible by patch_size={p}")
  x = x.reshape(b, h // p, p, w // p, p, c)  # [B, h, p, w, p, C]
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, p * p * c)


def unpatchify(x, p):
  """x: [B, h, w, p*p*C] -> [B, h*p, w*p, C]; the inverse of `patchify`."""
  chex.assert_rank(x, 4)
  b, h, w, f = x.shape
  if f % (p * p):
    raise ValueError(f"patch features {f} not divisible by patch_size**2={p * p}")
  x = x.reshape(b, h, w, p, p, f // (p * p)).transpose(0, 1, 3, 2, 4, 5)  # [B, h, p, w, p, C]
  return x.reshape(b, h * p, w * p, f // (p * p))


def timestep_features(t, dim=256, max_period=10_000.0):
  """t: [B] float (sigma * 1000) -> [B, dim] float32 `[cos, sin]` (diffusers `Timesteps` with
  flip_sin_to_cos=True, downscale_freq_shift=0)."""
  chex.assert_rank(t, 1)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs  # [B, dim/2]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def grid_rope(h, w, head_dim, theta=10_000.0):
  """(cos, sin), each [1, h*w, K] float32, for tokens in row-major order over an h x w grid."""
  if head_dim % 4:
    raise ValueError(f"head_dim={head_dim}: 2D RoPE needs a multiple of 4")
  inv = layers.rope_inv_freq(head_dim // 2, theta)  # [K/4]: theta ** (-4j / K)
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ang = np.concatenate([rows.reshape(-1, 1) * inv, cols.reshape(-1, 1) * inv], -1)  # [T, K/2]
  ang = jnp.asarray(np.concatenate([ang, ang], axis=-1)[None], jnp.float32)  # [1, T, K]
  return jnp.cos(ang), jnp.sin(ang)


def lumina_head_perm(head_dim):
  """perm[d] = the Lumina head-dim index that our head dim d holds (see module docstring)."""
  quarter, half = head_dim // 4, head_dim // 2
  pair = np.arange(half)
  lumina_pair = np.where(pair < quarter, 2 * pair, 2 * (pair - quarter) + 1)
  return np.concatenate([2 * lumina_pair, 2 * lumina_pair + 1])
