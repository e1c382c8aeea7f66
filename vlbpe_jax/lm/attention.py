"""Grouped-query self-attention with RoPE, optional QK-norm and q/k/v bias, and a KV cache.

The attention itself is `jax.nn.dot_product_attention` (GQA natively; `implementation=None` or
"xla" on CPU, "cudnn" for flash attention on NVIDIA GPUs, bf16/fp16 only), or, with
`implementation="blockwise"`, `blockwise_attention` (causal blocks, ~2x faster on CPU), or with
`"splash"` the Pallas splash kernel on TPU (splash.py).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlbpe_jax.lm import blockwise_attention
from vlbpe_jax.lm import layers
from vlbpe_jax.lm import splash


class Attention(nn.Module):
  """x: `[B, T, D]` -> `[B, T, D]`.

  Without a cache the attention is causal over the T tokens, restricted by `mask`
  (`[B, 1, T, T]` bool, e.g. segments of a packed row) when given; the "blockwise" and
  "splash" implementations take `segment_ids` (`[B, T]`) instead of a mask ("blockwise" also
  `branch_ids`, model.py's shared-prefix branches; with a mask the caller folds them in). With `cache = (k, v)`,
  each `[B, S, Nkv, K]`, the new keys/values are written at slots `[index, index + T)` and the
  queries attend to all S slots allowed by `mask` (`[B, 1, T, S]`, built by the caller).
  Returns `(y, new_cache)`; `new_cache` is None without a cache.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  qk_norm: bool = False
  qkv_bias: bool = False
  norm_eps: float = 1e-5
  init_std: float = 0.02
  implementation: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _proj(self, x, name, heads, head_axis):
    w = self.param(name, nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                      ("embed", head_axis, "kv")),
                   (x.shape[-1], heads, self.head_dim), self.param_dtype)
    y = jnp.einsum("BTD,DNK->BTNK", x, w.astype(self.dtype))
    if self.qkv_bias:
      b = self.param(name + "_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                  (head_axis, "kv")),
                     (heads, self.head_dim), self.param_dtype)
      y = y + b.astype(self.dtype)
    return y  # [B, T, N, K]

  @nn.compact
  def __call__(self, x, cos, sin, mask=None, cache=None, index=None, segment_ids=None,
               branch_ids=None):
    x = x.astype(self.dtype)
    q = self._proj(x, "q", self.num_heads, "heads")  # [B, T, N, K]
    k = self._proj(x, "k", self.num_kv_heads, "kv_heads")  # [B, T, Nkv, K]
    v = self._proj(x, "v", self.num_kv_heads, "kv_heads")  # [B, T, Nkv, K]
    if self.qk_norm:
      norm = dict(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                  axis_name="kv")
      q = layers.RMSNorm(name="q_norm", **norm)(q)
      k = layers.RMSNorm(name="k_norm", **norm)(k)
    q = layers.apply_rope(q, cos, sin)
    k = layers.apply_rope(k, cos, sin)
    q = nn.with_logical_constraint(q, ("act_batch", "act_len", "act_heads", "act_kv"))
    k = nn.with_logical_constraint(k, ("act_batch", "act_len", "act_kv_heads", "act_kv"))
    v = nn.with_logical_constraint(v, ("act_batch", "act_len", "act_kv_heads", "act_kv"))
    new_cache = None
    if cache is not None:
      ck, cv = cache
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
      new_cache = (k, v)  # [B, S, Nkv, K] each
      k, v = k.astype(self.dtype), v.astype(self.dtype)
    # Decoding with a cache (one query per step, memory-bound) always takes the XLA path.
    kernels = {"blockwise": blockwise_attention.blockwise_attention,
               "splash": splash.splash_attention}
    if self.implementation in kernels and cache is None:
      if branch_ids is None:
        y = kernels[self.implementation](q, k, v, segment_ids)  # [B, T, N, K]
      elif self.implementation == "blockwise":
        y = blockwise_attention.blockwise_attention(q, k, v, segment_ids, branch_ids=branch_ids)
      else:
        raise ValueError("branch_ids with attention_impl='splash': expected 'blockwise' or an "
                         "implementation that takes a mask (None, 'xla', 'cudnn')")
    else:
      impl = None if cache is not None or self.implementation in kernels else (
          self.implementation)
      y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=cache is None,
                                       implementation=impl)  # [B, T, N, K]
    y = nn.with_logical_constraint(y, ("act_batch", "act_len", "act_heads", "act_kv"))
    wo = self.param("o", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                      ("heads", "kv", "embed")),
                    (self.num_heads, self.head_dim, x.shape[-1]), self.param_dtype)
    return jnp.einsum("BTNK,NKD->BTD", y, wo.astype(self.dtype)), new_cache
