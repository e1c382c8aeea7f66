"""Taming-VQGAN encoder and decoder; sizes come from `VARIANTS`.

Downsampling factor f = patch * 2 ** (len(ch_mult) - 1); attention always sits in the middle
(lowest resolution) and also after the ResBlocks of the levels listed in `attn_levels`.
`patch` > 1 folds each patch x patch block of pixels into channels before the first conv and
unfolds the last conv's channels back into pixels (space-to-depth, as a ViT patch embedding):
on a CPU this trades thin full-resolution convs for fewer, wider ones.

`local` (encoder only): `conv_in` is `local_kernel` x `local_kernel`, every later conv 1x1, no
attention, and LayerNorm per position instead of GroupNorm. A code then sees only its own
local_kernel x local_kernel patches, so identical neighbourhoods get identical codes: a flat
background is one code per tone. Taming's encoder sees the whole image (GroupNorm statistics,
mid attention, a receptive field past the grid), and the demo's 16x16 grid gave 55-64 codes
per background tone (BENCHMARKS.md, "Codes per flat region").
"""

import chex
import flax.linen as nn
import jax.numpy as jnp

from vlbpe_jax.vq import layers

# ch: base width; ch_mult: width multiplier per level; groups: GroupNorm groups; patch:
# pixels per side folded into channels first (default 1).
ENCODER_ONLY = ("local", "local_kernel")  # VARIANTS keys the Decoder does not take
VARIANTS = {
    # CPU-sized: f=4 (64 px -> 16x16), widths 16/32/32.
    "tiny": dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, groups=8,
                 attn_levels=()),
    # CPU-sized, f=4 as 4x4 patches into channels, then one 16x16 level of width 64: about
    # twice the steps per second of "tiny" on a 2-core CPU at the same quality per step.
    "tiny_p4": dict(ch=64, ch_mult=(1,), num_res_blocks=1, z_channels=64, groups=8,
                    attn_levels=(), patch=4),
    # tiny_p4 whose encoder is local (each code reads its 3x3 patch neighbourhood, 12x12 px).
    "tiny_p4_local": dict(ch=64, ch_mult=(1,), num_res_blocks=1, z_channels=64, groups=8,
                          attn_levels=(), patch=4, local=True, local_kernel=3),
    # tiny_p4 whose encoder reads each 4x4 patch alone: equal patches get equal codes.
    "tiny_p4_patch": dict(ch=64, ch_mult=(1,), num_res_blocks=1, z_channels=64, groups=8,
                          attn_levels=(), patch=4, local=True, local_kernel=1),
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


def downsample_factor(variant: str) -> int:
  """Pixels per code along each side: patch * 2 ** (levels - 1)."""
  sizes = decode_variant(variant)
  return sizes.get("patch", 1) * 2 ** (len(sizes["ch_mult"]) - 1)


def space_to_depth(x, p: int):
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C] (each p x p block into channels, row-major)."""
  b, h, w, c = x.shape
  chex.assert_is_divisible(h, p)
  chex.assert_is_divisible(w, p)
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)  # [B, h, w, p, p, C]
  return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x, p: int):
  """[B, h, w, p*p*C] -> [B, h*p, w*p, C]; the inverse of `space_to_depth`."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)  # [B, h, p, w, p, C]
  return x.reshape(b, h * p, w * p, c // (p * p))


class Encoder(nn.Module):
  """[B, H, W, 3] -> [B, H/f, W/f, z_channels]."""
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  z_channels: int
  groups: int = 32
  attn_levels: tuple[int, ...] = ()
  patch: int = 1
  dtype: jnp.dtype = jnp.float32
  local: bool = False
  local_kernel: int = 3

  @nn.compact
  def __call__(self, x):
    if self.local and len(self.ch_mult) != 1:
      raise ValueError(f"local encoder with ch_mult={self.ch_mult}: expected one level (the "
                       "downsampling is `patch`)")
    k = 1 if self.local else 3
    groups = 0 if self.local else self.groups
    kw = dict(groups=groups, dtype=self.dtype, kernel=k)
    if self.patch > 1:
      x = space_to_depth(x, self.patch)  # [B, H/p, W/p, p*p*3]
    h = layers.conv(self.ch, self.local_kernel if self.local else 3, "conv_in",
                    dtype=self.dtype)(x.astype(self.dtype))
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = layers.ResBlock(self.ch * mult, name=f"down_{i}_block_{j}", **kw)(h)
        if i in self.attn_levels and not self.local:
          h = layers.AttnBlock(name=f"down_{i}_attn_{j}", groups=groups, dtype=self.dtype)(h)
      if i != len(self.ch_mult) - 1:
        h = layers.Downsample(self.dtype, name=f"down_{i}_downsample")(h)
    h = layers.ResBlock(h.shape[-1], name="mid_block_1", **kw)(h)
    if not self.local:
      h = layers.AttnBlock(name="mid_attn_1", groups=groups, dtype=self.dtype)(h)
    h = layers.ResBlock(h.shape[-1], name="mid_block_2", **kw)(h)
    h = nn.silu(layers.group_norm(groups, "norm_out", self.dtype)(h))
    return layers.conv(self.z_channels, k, "conv_out", dtype=self.dtype)(h)


class Decoder(nn.Module):
  """[B, h, w, z_channels] -> [B, h*f, w*f, 3].

  The features entering `conv_out` are sown as `intermediates/features` so that the GAN's
  adaptive weight can differentiate the losses with respect to the last layer alone
  (`conv_out` has out_channels * patch**2 outputs, unfolded by `depth_to_space`).
  `context`: further inputs, passed to `_mid` after the middle self-attention (the identity
  here; v2l/decoder.py inserts a cross-attention to its global tokens there).
  """
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  z_channels: int
  groups: int = 32
  attn_levels: tuple[int, ...] = ()
  patch: int = 1
  dtype: jnp.dtype = jnp.float32
  out_channels: int = 3

  def _mid(self, h, *context):
    """The hook after `mid_attn_1`: [B, h, w, C] -> [B, h, w, C] (modules made here are the
    decoder's, as in the compact body)."""
    if context:
      raise ValueError(f"{type(self).__name__} takes one input, got {len(context)} more")
    return h

  @nn.compact
  def __call__(self, z, *context):
    kw = dict(groups=self.groups, dtype=self.dtype)
    h = layers.conv(self.ch * self.ch_mult[-1], 3, "conv_in", dtype=self.dtype)(
        z.astype(self.dtype))
    h = layers.ResBlock(h.shape[-1], name="mid_block_1", **kw)(h)
    h = layers.AttnBlock(name="mid_attn_1", **kw)(h)
    h = self._mid(h, *context)
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
    out = decoder_conv_out(self.out_channels * self.patch ** 2, self.dtype)(h)
    return depth_to_space(out, self.patch).astype(jnp.float32)


def decoder_conv_out(features: int, dtype=jnp.float32):
  """The decoder's last conv (replicated output channels); losses re-apply it alone."""
  return layers.conv(features, 3, "conv_out", out_axis=None, dtype=dtype)
