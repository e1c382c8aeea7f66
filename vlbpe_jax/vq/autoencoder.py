"""Taming-VQGAN encoder and decoder; sizes come from `VARIANTS`.

Downsampling factor f = 2 ** (len(ch_mult) - 1); attention always sits in the middle (lowest
resolution) and also after the ResBlocks of the levels listed in `attn_levels`.
"""

import flax.linen as nn
import jax.numpy as jnp

from vlbpe_jax.vq import layers

# ch: base width; ch_mult: width multiplier per level; groups: GroupNorm groups.
VARIANTS = {
    # CPU-sized: f=4 (64 px -> 16x16), widths 16/32/32.
    "tiny": dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, groups=8,
                 attn_levels=()),
    # CPU-sized: f=2 (64 px -> 32x32, the Being-VL grid size), widths 16/32.
    "tiny_f2": dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, groups=8,
                    attn_levels=()),
    # Tests: f=4, widths 8/16.
    "mu": dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, groups=4,
               attn_levels=()),
    # V2L-like: f=8 (128 px -> 16x16).
    "f8": dict(ch=128, ch_mult=(1, 1, 2, 4), num_res_blocks=2, z_channels=256, groups=32,
               attn_levels=()),
    # Chameleon VQ-VAE / taming f16 (512 px -> 32x32, 256 px -> 16x16).
    "chameleon": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256,
                      groups=32, attn_levels=()),
    "taming_f16": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256,
                       groups=32, attn_levels=(4,)),
}


def decode_variant(variant: str) -> dict:
  if variant not in VARIANTS:
    raise ValueError(f"vq variant={variant!r} unknown; expected one of {sorted(VARIANTS)}")
  return dict(VARIANTS[variant])


class Encoder(nn.Module):
  """[B, H, W, 3] -> [B, H/f, W/f, z_channels]."""
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  z_channels: int
  groups: int = 32
  attn_levels: tuple[int, ...] = ()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(groups=self.groups, dtype=self.dtype)
    h = layers.conv(self.ch, 3, "conv_in", dtype=self.dtype)(x.astype(self.dtype))
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = layers.ResBlock(self.ch * mult, name=f"down_{i}_block_{j}", **kw)(h)
        if i in self.attn_levels:
          h = layers.AttnBlock(name=f"down_{i}_attn_{j}", **kw)(h)
      if i != len(self.ch_mult) - 1:
        h = layers.Downsample(self.dtype, name=f"down_{i}_downsample")(h)
    h = layers.ResBlock(h.shape[-1], name="mid_block_1", **kw)(h)
    h = layers.AttnBlock(name="mid_attn_1", **kw)(h)
    h = layers.ResBlock(h.shape[-1], name="mid_block_2", **kw)(h)
    h = nn.silu(layers.group_norm(self.groups, "norm_out", self.dtype)(h))
    return layers.conv(self.z_channels, 3, "conv_out", dtype=self.dtype)(h)


class Decoder(nn.Module):
  """[B, h, w, z_channels] -> [B, h*f, w*f, 3].

  The features entering `conv_out` are sown as `intermediates/features` so that the GAN's
  adaptive weight can differentiate the losses with respect to the last layer alone.
  """
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  z_channels: int
  groups: int = 32
  attn_levels: tuple[int, ...] = ()
  dtype: jnp.dtype = jnp.float32
  out_channels: int = 3

  @nn.compact
  def __call__(self, z):
    kw = dict(groups=self.groups, dtype=self.dtype)
    h = layers.conv(self.ch * self.ch_mult[-1], 3, "conv_in", dtype=self.dtype)(
        z.astype(self.dtype))
    h = layers.ResBlock(h.shape[-1], name="mid_block_1", **kw)(h)
    h = layers.AttnBlock(name="mid_attn_1", **kw)(h)
    h = layers.ResBlock(h.shape[-1], name="mid_block_2", **kw)(h)
    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = layers.ResBlock(self.ch * self.ch_mult[i], name=f"up_{i}_block_{j}", **kw)(h)
        if i in self.attn_levels:
          h = layers.AttnBlock(name=f"up_{i}_attn_{j}", **kw)(h)
      if i != 0:
        h = layers.Upsample(self.dtype, name=f"up_{i}_upsample")(h)
    h = nn.silu(layers.group_norm(self.groups, "norm_out", self.dtype)(h))
    self.sow("intermediates", "features", h)
    out = layers.conv(self.out_channels, 3, "conv_out", out_axis=None, dtype=self.dtype)(h)
    return out.astype(jnp.float32)
