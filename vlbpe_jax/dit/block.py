"""One Lumina-Next DiT block with BLIP3-o's gated cross-attention (`LuminaNextDiTBlock`).

  m = Linear(silu(temb)) -> scale_msa, gate_msa, scale_mlp, gate_mlp      (zero-initialised)
  h = RMSNorm(x) * (1 + scale_msa)
  a = out(SelfAttn(h) + tanh(gate) * CrossAttn(h, RMSNorm(y)))           (gate per head, 0 init)
  x = x + tanh(gate_msa) * RMSNorm(a)
  x = x + tanh(gate_mlp) * RMSNorm(SwiGLU(RMSNorm(x) * (1 + scale_mlp)))

Self-attention: RoPE on q and k. Cross-attention: RoPE on q only, keys/values from the
projected condition `y`, padding masked by `cond_mask`. QK-norm is a LayerNorm (with affine)
over all heads' features at once (diffusers `layer_norm_across_heads`, eps 1e-5).
Attention scale 1/sqrt(K) in both.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlbpe_jax.dit import embed
from vlbpe_jax.lm import layers

QK_NORM_EPS = 1e-5  # fixed in Lumina's Attention, whatever norm_eps is
ACT = ("act_batch", "act_len", "act_embed")


class JointAttention(nn.Module):
  """x: [B, T, D], y: [B, S, D], y_mask: [B, S] bool, cos/sin: [1, T, K] -> [B, T, D]."""
  heads: int
  qk_norm: bool = True
  cross_gate_init: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _proj(self, x, name, k):
    init = nn.with_logical_partitioning(nn.initializers.xavier_uniform(batch_axis=(1,)),
                                        ("embed", "heads", "kv"))
    w = self.param(name, init, (x.shape[-1], self.heads, k), self.param_dtype)
    return jnp.einsum("BTD,DNK->BTNK", x, w.astype(self.dtype))

  def _norm(self, x, name):
    if not self.qk_norm:
      return x
    init = lambda f: nn.with_logical_partitioning(f, ("heads", "kv"))  # noqa: E731
    return nn.LayerNorm(epsilon=QK_NORM_EPS, reduction_axes=(-2, -1), feature_axes=(-2, -1),
                        dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                        scale_init=init(nn.initializers.ones),
                        bias_init=init(nn.initializers.zeros))(x)

  @nn.compact
  def __call__(self, x, y, y_mask, cos, sin):
    k = x.shape[-1] // self.heads
    q1 = layers.apply_rope(self._norm(self._proj(x, "self_q", k), "self_q_norm"), cos, sin)
    k1 = layers.apply_rope(self._norm(self._proj(x, "self_k", k), "self_k_norm"), cos, sin)
    v1 = self._proj(x, "self_v", k)  # [B, T, N, K]
    o1 = jax.nn.dot_product_attention(q1, k1, v1)  # [B, T, N, K]
    q2 = layers.apply_rope(self._norm(self._proj(x, "cross_q", k), "cross_q_norm"), cos, sin)
    k2 = self._norm(self._proj(y, "cross_k", k), "cross_k_norm")  # [B, S, N, K]
    v2 = self._proj(y, "cross_v", k)
    o2 = jax.nn.dot_product_attention(q2, k2, v2, mask=y_mask[:, None, None, :])
    gate = self.param("cross_gate", nn.with_logical_partitioning(
        nn.initializers.constant(self.cross_gate_init), ("heads",)), (self.heads,),
                      self.param_dtype)
    o = o1 + jnp.tanh(gate.astype(jnp.float32)).astype(self.dtype)[:, None] * o2
    o = nn.with_logical_constraint(o, ("act_batch", "act_len", "act_heads", "act_kv"))
    w = self.param("out", nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2), ("heads", "kv", "embed")),
        (self.heads, k, x.shape[-1]), self.param_dtype)
    return jnp.einsum("BTNK,NKD->BTD", o, w.astype(self.dtype))


class Block(nn.Module):
  """x: [B, T, D], y: [B, S, D] projected condition, y_mask: [B, S] bool, temb: [B, E],
  cos/sin: [1, T, K]. Returns `(x, None)` so that it can be scanned."""
  heads: int
  mlp_dim: int
  norm_eps: float = 1e-5
  qk_norm: bool = True
  cross_gate_init: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y, y_mask, temb, cos, sin):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: layers.RMSNorm(self.norm_eps, name=name, **kw)  # noqa: E731
    d = x.shape[-1]
    mod = embed.dense(4 * d, (None, "embed"), "adaln", zero=True, **kw)(nn.silu(temb))
    scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(mod[:, None], 4, axis=-1)  # [B, 1, D]
    h = norm("attn_norm1")(x) * (1 + scale_msa)
    a = JointAttention(self.heads, self.qk_norm, self.cross_gate_init, name="attn", **kw)(
        h, norm("cond_norm")(y), y_mask, cos, sin)
    x = x + jnp.tanh(gate_msa) * norm("attn_norm2")(a)
    x = nn.with_logical_constraint(x, ACT)
    h = norm("ffn_norm1")(x) * (1 + scale_mlp)
    h = layers.Mlp(self.mlp_dim, name="mlp", **kw)(h)
    x = x + jnp.tanh(gate_mlp) * norm("ffn_norm2")(h)
    return nn.with_logical_constraint(x, ACT), None
