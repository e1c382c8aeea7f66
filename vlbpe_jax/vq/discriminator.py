"""PatchGAN discriminator (taming `NLayerDiscriminator`): [B, H, W, 3] -> logits [B, h, w, 1].

taming normalises with BatchNorm; here GroupNorm keeps the discriminator a pure function of
its parameters (no running statistics in the state), with the same layer layout.
"""

import flax.linen as nn
import jax.numpy as jnp

from vlbpe_jax.vq import layers

# ndf: base width; n_layers: stride-2 layers (receptive field 70 px at 3, 34 px at 2).
DISC_VARIANTS = {
    "tiny": dict(ndf=16, n_layers=2),
    "taming": dict(ndf=64, n_layers=3),
}


class PatchDiscriminator(nn.Module):
  ndf: int = 64
  n_layers: int = 3
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: [B, H, W, 3] in [-1, 1]
    pad = ((1, 1), (1, 1))
    h = layers.conv(self.ndf, 4, "conv_0", stride=2, padding=pad, dtype=self.dtype)(
        x.astype(self.dtype))
    h = nn.leaky_relu(h, 0.2)
    for n in range(1, self.n_layers + 1):
      width = self.ndf * min(2 ** n, 8)
      stride = 2 if n < self.n_layers else 1
      h = layers.conv(width, 4, f"conv_{n}", stride=stride, padding=pad, dtype=self.dtype)(h)
      h = layers.group_norm(min(32, width // 4), f"norm_{n}", self.dtype)(h)
      h = nn.leaky_relu(h, 0.2)
      h = nn.with_logical_constraint(h, layers.ACT)
    out = layers.conv(1, 4, "conv_out", padding=pad, out_axis=None, dtype=self.dtype)(h)
    return out.astype(jnp.float32)  # [B, h, w, 1]


def make_discriminator(variant: str, dtype=jnp.float32) -> PatchDiscriminator:
  if variant not in DISC_VARIANTS:
    raise ValueError(f"vq.disc_variant={variant!r} unknown; expected one of "
                     f"{sorted(DISC_VARIANTS)}")
  return PatchDiscriminator(dtype=dtype, **DISC_VARIANTS[variant])
