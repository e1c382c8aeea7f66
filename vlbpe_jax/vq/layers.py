"""Taming-VQGAN building blocks in [B, H, W, C] layout: conv, ResBlock, attention, resampling.

Parameter names follow the taming / Chameleon PyTorch modules (`norm1`, `conv1`,
`nin_shortcut`, `q`, `k`, `v`, `proj_out`) so that `convert.py` maps checkpoints by name.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

ACT = ("act_batch", "act_height", "act_width", "act_channels")


def conv(features, kernel, name=None, *, stride=1, padding="SAME", out_axis="conv_out",
         dtype=jnp.float32):
  """A Conv with logical names on its kernel `[kh, kw, C_in, C_out]` and bias.

  `out_axis=None` replicates the output channels (3 RGB or 1 logit channels do not split).
  """
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ("conv_h", "conv_w", "conv_in", out_axis)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)),
      name=name)


def group_norm(groups, name, dtype=jnp.float32):
  """GroupNorm as in taming (eps 1e-6, affine); statistics in float32.

  groups=0: LayerNorm over the channels of each position instead (same parameter names), so
  that a position's output does not depend on the rest of the image (`Encoder(local=True)`).
  """
  kw = dict(epsilon=1e-6, dtype=dtype, name=name,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))
  if groups == 0:
    return nn.LayerNorm(**kw)
  return nn.GroupNorm(num_groups=groups, **kw)


class ResBlock(nn.Module):
  """norm-SiLU-conv twice plus a (1x1 conv when widths differ) shortcut."""
  features: int
  groups: int = 32  # 0: per-position LayerNorm (`group_norm`)
  dtype: jnp.dtype = jnp.float32
  kernel: int = 3

  @nn.compact
  def __call__(self, x):  # x: [B, H, W, C]
    h = conv(self.features, self.kernel, "conv1", dtype=self.dtype)(
        nn.silu(group_norm(self.groups, "norm1", self.dtype)(x)))
    h = conv(self.features, self.kernel, "conv2", dtype=self.dtype)(
        nn.silu(group_norm(self.groups, "norm2", self.dtype)(h)))
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, "nin_shortcut", dtype=self.dtype)(x)
    return nn.with_logical_constraint(x + h, ACT)


class AttnBlock(nn.Module):
  """Single-head spatial self-attention over all H*W positions (taming `AttnBlock`)."""
  groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: [B, H, W, C]
    b, hh, ww, c = x.shape
    h = group_norm(self.groups, "norm", self.dtype)(x)
    q, k, v = (conv(c, 1, n, dtype=self.dtype)(h).reshape(b, hh * ww, c)  # [B, T, C]
               for n in ("q", "k", "v"))
    logits = jnp.einsum("BTC,BSC->BTS", q, k) * (c ** -0.5)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum("BTS,BSC->BTC", weights, v).reshape(b, hh, ww, c)  # [B, H, W, C]
    h = conv(c, 1, "proj_out", dtype=self.dtype)(h)
    return nn.with_logical_constraint(x + h, ACT)


class Downsample(nn.Module):
  """Stride-2 3x3 conv with taming's asymmetric (0, 1) padding: [B, H, W, C] -> H/2, W/2."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    chex.assert_rank(x, 4)
    return conv(x.shape[-1], 3, "conv", stride=2, padding=((0, 1), (0, 1)),
                dtype=self.dtype)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then a 3x3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
    return conv(x.shape[-1], 3, "conv", dtype=self.dtype)(x)
