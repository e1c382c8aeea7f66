"""CLIP's two towers (OpenAI layout); model.CLIP wires them and checks inputs.

VisionTower: conv patch embedding (no bias; or, with `conv_stem`, 3x3 stride-2 convs + GELU and a
1x1 conv, no bias) -> [CLS; patches] + learned positions -> ln_pre ->
blocks; `head` = ln_post on the CLS token, then `proj` (no bias). TextTower: token + learned
position embeddings -> causal blocks -> ln_final -> the state at the last non-pad token -> `proj`.
Init stds are OpenAI's.
"""

import flax.linen as nn
import jax.numpy as jnp

from vlbpe_jax.clip import layers
from vlbpe_jax.clip.config import CLIPConfig

_EDGE = ("act_batch", "act_len", "act_embed")


def _kw(c):
  return dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))


def _param(module, name, std, shape, axes):
  init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
  return module.param(name, init, shape, jnp.dtype(module.config.param_dtype))


class VisionTower(nn.Module):
  """pixels `[B, R, R, 3]` (normalised) -> tokens `[B, 1 + h*w, D]` after the last block."""
  config: CLIPConfig

  def setup(self):
    c, kw = self.config, _kw(self.config)
    d, p = c.width, c.patch_size
    conv_axes = ("conv_h", "conv_w", "conv_in", "conv_out")
    self.stem = [
        nn.Conv(w, (3, 3), strides=(2, 2), padding="SAME", name=f"stem_{i}",
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         conv_axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                **kw)
        for i, w in enumerate(c.conv_stem)]
    # After a stem: a 1x1 conv (the stem has downsampled by p), fan-in init so that its output
    # is not drowned by the position embeddings (std d**-0.5) before ln_pre.
    k = 1 if c.conv_stem else p
    init = nn.initializers.lecun_normal() if c.conv_stem else nn.initializers.normal(0.02)
    self.patch_embed = nn.Conv(
        d, (k, k), strides=(k, k), padding="VALID", use_bias=False, name="patch_embed",
        kernel_init=nn.with_logical_partitioning(init, conv_axes), **kw)
    self.class_embedding = _param(self, "class_embedding", d ** -0.5, (d,), ("embed",))
    self.position_embedding = _param(self, "position_embedding", d ** -0.5,
                                     (c.grid * c.grid + 1, d), (None, "embed"))
    self.ln_pre = layers.layer_norm(c.norm_eps, name="ln_pre", **kw)
    self.transformer = layers.Transformer(c.depth, c.heads, c.vision_mlp, c.act, causal=False,
                                          norm_eps=c.norm_eps, name="transformer", **kw)
    self.ln_post = layers.layer_norm(c.norm_eps, name="ln_post", **kw)
    self.proj = _param(self, "proj", d ** -0.5, (d, c.embed_dim), ("embed", None))

  def __call__(self, pixels):
    dt = jnp.dtype(self.config.dtype)
    x = pixels.astype(dt)
    for conv in self.stem:  # [B, R, R, 3] -> [B, h, w, conv_stem[-1]]
      x = nn.gelu(conv(x))
    x = self.patch_embed(x)  # [B, h, w, D]
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, h*w, D]
    cls = jnp.broadcast_to(self.class_embedding.astype(dt), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding.astype(dt)  # [B, 1+h*w, D]
    x = nn.with_logical_constraint(self.ln_pre(x), _EDGE)
    return self.transformer(x)

  def head(self, cls):
    """cls `[B, D]` (the CLS token after the last block) -> `[B, E]`."""
    h = self.ln_post(cls)
    return jnp.einsum("BD,DE->BE", h, self.proj.astype(h.dtype))


class TextTower(nn.Module):
  """ids `[B, T]` int (pad 0 after the sequence) -> `[B, E]` at the last non-pad token."""
  config: CLIPConfig

  @nn.compact
  def __call__(self, ids):
    c, kw = self.config, _kw(self.config)
    d, t = c.text_width, ids.shape[1]
    table = _param(self, "token_embedding", 0.02, (c.vocab_size, d), ("vocab", "embed"))
    pos = _param(self, "position_embedding", 0.01, (c.context_len, d), (None, "embed"))
    x = (jnp.take(table, ids, axis=0) + pos[:t]).astype(kw["dtype"])  # [B, T, D]
    x = nn.with_logical_constraint(x, _EDGE)
    x = layers.Transformer(c.text_depth, c.text_heads, c.text_mlp, c.act, causal=True,
                           norm_eps=c.norm_eps, name="transformer", **kw)(x)
    x = layers.layer_norm(c.norm_eps, name="ln_final", **kw)(x)
    eos = jnp.max(jnp.where(ids != 0, jnp.arange(t), 0), axis=1)  # [B] last non-pad
    h = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]  # [B, D]
    proj = _param(self, "proj", d ** -0.5, (d, c.embed_dim), ("embed", None))
    return jnp.einsum("BD,DE->BE", h, proj.astype(h.dtype))
