"""BLIP3-o's generator: a Lumina-Next DiT (`nextdit_crossattn.py`) predicting flow velocity.

  model = DiT(config_for("tiny", in_channels=32, cond_dim=64))
  params = nn.unbox(model.init(key, x, t, cond, cond_mask)["params"])
  v = model.apply({"params": params}, x, t, cond, cond_mask)   # [B, H, W, C], eps - x0

x [B, H, W, C] -> p x p patches (embed.py) -> Linear to D; cond [B, Q, cond_dim] ->
caption projection (Linear, GELU-tanh, Linear) -> y [B, Q, D]; temb [B, min(D, 1024)] =
MLP(sinusoid(t)) + Linear(LayerNorm(masked mean of y)); `depth` blocks; final LayerNorm (no
affine, eps 1e-6) scaled by 1 + Linear(silu(temb)), Linear to p*p*C; unpatchify. Blocks:
block.py. BLIP3-o passes an all-ones cond_mask (64 queries); padding masks work here too.

Known differences from BLIP3-o's code (diffusers `LuminaNextDiT2DModel` + its cross-attn edit):
- Init: adaLN modulations and the final Linear are zero-initialised (Lumina-Next / DiT); BLIP3-o
  builds the diffusers class, whose Linears keep PyTorch's default init (the per-head
  cross-attention gate is zero in both). Other Linears: xavier-uniform; SwiGLU normal(0.02).
- num_kv_heads == heads only (BLIP3-o: 28 and 28); no `learn_sigma`; no proportional
  attention (`base_sequence_length`, unused by BLIP3-o).
- 2D RoPE pairs and patch features use our layouts (embed.py); hf.py permutes on import.
- The masked mean divides by max(count, 1) (an all-masked row gives 0, not NaN); an all-masked
  cross-attention row attends uniformly rather than giving NaN.
- Not a difference but a pin: SwiGLU width int(2 * 4 * dim / 3) rounded up to multiple_of
  (4864 for dim 1792), as in diffusers' LuminaFeedForward (<= 0.32) under BLIP3-o's
  `inner_dim=4 * dim` call: its ~1.36B parameters need it. diffusers >= 0.33 dropped the
  2/3 there (7168 wide under the same call); such a checkpoint loads with
  ffn_dim_multiplier=1.5.
- SwiGLU's SiLU runs in the compute dtype (diffusers: float32); same in float32.
- Positions are computed for the input grid; BLIP3-o slices a 384x384 table (same values).
"""

import chex
import flax.linen as nn
import jax.numpy as jnp

from vlbpe_jax.dit import block
from vlbpe_jax.dit import embed
from vlbpe_jax.dit.config import REMAT_POLICIES, VARIANTS, DiTConfig, config_for  # noqa: F401


class DiT(nn.Module):
  """See the module docstring."""
  config: DiTConfig

  @nn.compact
  def __call__(self, x, t, cond, cond_mask):
    """x: [B, H, W, C] float; t: [B] float (sigma * 1000); cond: [B, Q, cond_dim] float;
    cond_mask: [B, Q] bool (False = padding). Returns the velocity [B, H, W, C] float32."""
    c = self.config
    chex.assert_rank([x, t, cond, cond_mask], [4, 1, 3, 2])
    b, hh, ww, ch = x.shape
    if ch != c.in_channels:
      raise ValueError(f"x has {ch} channels; config.in_channels={c.in_channels}")
    chex.assert_shape([t, cond, cond_mask], [(b,), (b, None, c.cond_dim), cond.shape[:2]])
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    p = c.patch_size
    patches = embed.patchify(x.astype(kw["dtype"]), p)  # [B, h, w, P]
    h_tok, w_tok = patches.shape[1:3]
    h = embed.dense(c.dim, (None, "embed"), "patch_embed", **kw)(
        patches.reshape(b, h_tok * w_tok, -1))  # [B, T, D]
    h = nn.with_logical_constraint(h, block.ACT)

    y = embed.dense(c.dim, (None, "embed"), "cap_in", **kw)(cond.astype(kw["dtype"]))
    y = embed.dense(c.dim, ("mlp", "embed"), "cap_out", **kw)(nn.gelu(y, approximate=True))
    y = nn.with_logical_constraint(y, block.ACT)  # [B, Q, D]
    temb = self.time_caption_embed(t, y, cond_mask, kw)  # [B, E]

    cos, sin = embed.grid_rope(h_tok, w_tok, c.head_dim, c.rope_theta)
    layer = block.Block
    if c.remat_policy != "none":
      layer = nn.remat(layer, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=not c.scan_layers)
    args = dict(heads=c.heads, mlp_dim=c.ffn_dim, norm_eps=c.norm_eps, qk_norm=c.qk_norm,
                cross_gate_init=c.cross_gate_init, **kw)
    if c.scan_layers:
      stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast,) * 5, length=c.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      h, _ = stack(name="layers", **args)(h, y, cond_mask, temb, cos, sin)
    else:
      for i in range(c.depth):
        h, _ = layer(name=f"layers_{i}", **args)(h, y, cond_mask, temb, cos, sin)

    scale = embed.dense(c.dim, (None, "embed"), "final_scale", zero=True, **kw)(nn.silu(temb))
    h = nn.LayerNorm(1e-6, use_bias=False, use_scale=False, **kw)(h) * (1 + scale[:, None])
    out = embed.dense(p * p * c.in_channels, ("embed", None), "final_out", zero=True, **kw)(h)
    out = embed.unpatchify(out.reshape(b, h_tok, w_tok, -1), p)
    return out.astype(jnp.float32)

  def time_caption_embed(self, t, y, y_mask, kw):
    """t: [B], y: [B, Q, D], y_mask: [B, Q] -> temb [B, min(D, 1024)]."""
    c = self.config
    e = c.temb_dim
    f = embed.timestep_features(t, c.t_embed_dim).astype(kw["dtype"])  # [B, 256]
    f = embed.dense(e, (None, "embed"), "t_in", **kw)(f)
    f = embed.dense(e, ("mlp", "embed"), "t_out", **kw)(nn.silu(f))
    m = y_mask.astype(jnp.float32)[..., None]  # [B, Q, 1]
    pooled = (y.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)  # [B, D]
    init = lambda f: nn.with_logical_partitioning(f, ("norm",))  # noqa: E731
    pooled = nn.LayerNorm(1e-5, scale_init=init(nn.initializers.ones), name="cap_pool_norm",
                          bias_init=init(nn.initializers.zeros), **kw)(pooled.astype(kw["dtype"]))
    return f + embed.dense(e, ("embed", None), "cap_pool", **kw)(pooled)
