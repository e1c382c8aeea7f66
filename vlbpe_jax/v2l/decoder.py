"""V2L decoder: the taming VQGAN decoder with one cross-attention to the global tokens.

`V2LDecoder` is vq/autoencoder.Decoder (the same blocks and names: conv_in, mid_block_1,
mid_attn_1, [mid_cross_attn], mid_block_2, up_i_block_j, up_i_attn_j, up_i_upsample, norm_out,
conv_out) with `CrossAttention` in its hook after the mid self-attention, as the public code's
`mid.cross_attn_1` (queries: the h x w feature map; keys/values: the global entries' CLIP
embeddings [B, Kg, E]; 8 heads of width C there).

Two departures from the public code, both so that "no global tokens" is a defined input (the
report compares reconstructions with and without them):
- the public block replaces the map by the attention output (no norm, no residual); here it is
  a residual pre-norm block, x + out(attn(norm(x), g));
- a mask [B, Kg] says which global rows exist; masked rows get no weight, and a row with no
  global token at all adds nothing (the block is the identity for it).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlbpe_jax.vq import autoencoder
from vlbpe_jax.vq import layers

_HEADS = ("act_batch", "act_len", "act_heads", "act_kv")


class CrossAttention(nn.Module):
  """x: [B, H, W, C] queries; context: [B, S, E]; mask: [B, S] bool -> [B, H, W, C]."""
  heads: int = 8
  head_dim: int | None = None  # None: C (the public code's dim_head=block_in)
  groups: int = 32
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _w(self, name, shape, axes, init=nn.initializers.lecun_normal()):
    return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                      self.param_dtype).astype(self.dtype)

  @nn.compact
  def __call__(self, x, context, mask):
    chex.assert_rank([x, context, mask], [4, 3, 2])
    chex.assert_equal_shape_prefix([x, context, mask], 1)
    chex.assert_axis_dimension(mask, 1, context.shape[1])
    b, hh, ww, c = x.shape
    n, k, e = self.heads, self.head_dim or c, context.shape[-1]
    h = layers.group_norm(self.groups, "norm", self.dtype)(x).reshape(b, hh * ww, c)
    g = context.astype(self.dtype)
    q = jnp.einsum("BTC,CNK->BTNK", h, self._w("q", (c, n, k), ("embed", "heads", "kv")))
    key = jnp.einsum("BSE,ENK->BSNK", g, self._w("k", (e, n, k), ("embed", "heads", "kv")))
    v = jnp.einsum("BSE,ENK->BSNK", g, self._w("v", (e, n, k), ("embed", "heads", "kv")))
    q, key, v = (nn.with_logical_constraint(t, _HEADS) for t in (q, key, v))
    logits = jnp.einsum("BTNK,BSNK->BNTS", q, key).astype(jnp.float32) * (k ** -0.5)
    valid = mask[:, None, None, :]  # [B, 1, 1, S]
    weights = jax.nn.softmax(jnp.where(valid, logits, -1e30), axis=-1)
    weights = jnp.where(valid, weights, 0.0).astype(v.dtype)  # all masked: zero weights
    y = jnp.einsum("BNTS,BSNK->BTNK", weights, v)  # [B, T, N, K]
    out = jnp.einsum("BTNK,NKC->BTC", y, self._w("o", (n, k, c), ("heads", "kv", "embed")))
    out = out + self._w("o_bias", (c,), ("embed",), nn.initializers.zeros_init())
    out = jnp.where(jnp.any(mask, axis=1)[:, None, None], out, 0.0)  # no global token: no-op
    return nn.with_logical_constraint(x + out.reshape(b, hh, ww, c), layers.ACT)


class V2LDecoder(autoencoder.Decoder):
  """`decoder(z [B, h, w, z_channels], global_emb [B, Kg, E], global_mask [B, Kg] bool)` ->
  [B, h*f, w*f, 3] float32. Features entering conv_out are sown as `intermediates/features`
  (the GAN's adaptive weight differentiates with respect to conv_out alone, as vq/train.py)."""
  cross_heads: int = 8
  cross_head_dim: int | None = None
  param_dtype: jnp.dtype = jnp.float32

  def _mid(self, h, *context):
    if len(context) != 2:
      raise ValueError(f"V2LDecoder takes (z, global_emb, global_mask), got {len(context) + 1} "
                       "inputs")
    global_emb, global_mask = context
    return CrossAttention(self.cross_heads, self.cross_head_dim, groups=self.groups,
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          name="mid_cross_attn")(h, global_emb, global_mask)
