"""OpenAI-CLIP transformer pieces: LayerNorm, biased multi-head attention, MLP, residual block.

Pre-LN residual blocks `x + attn(ln_1(x))`, `x + mlp(ln_2(x))` shared by the image tower
(bidirectional) and the text tower (causal). Parameter layout follows lm/attention.py
(`q: [D, N, K]`, `o: [N, K, D]`) plus the biases OpenAI CLIP has on q, k, v and out.
Init stds are OpenAI's (`attn_std = D**-0.5 * (2 * depth)**-0.5`, see `Transformer`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
}
_EDGE = ("act_batch", "act_len", "act_embed")


def layer_norm(eps, dtype, param_dtype, name):
  """LayerNorm with scale and bias named `("norm",)`, computed in float32."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      name=name)


class Attention(nn.Module):
  """Multi-head self-attention with q/k/v/out biases. x: `[B, T, D]` -> `[B, T, D]`."""
  num_heads: int
  causal: bool
  in_std: float
  out_std: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _param(self, name, shape, axes, std=None):
    init = nn.initializers.zeros if std is None else nn.initializers.normal(std)
    w = self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)
    return w.astype(self.dtype)

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    n, k = self.num_heads, d // self.num_heads
    if n * k != d:
      raise ValueError(f"width={d} is not divisible by heads={n}")
    x = x.astype(self.dtype)

    def proj(name):
      w = self._param(name, (d, n, k), ("embed", "heads", "kv"), self.in_std)
      b = self._param(name + "_bias", (n, k), ("heads", "kv"))
      y = jnp.einsum("BTD,DNK->BTNK", x, w) + b  # [B, T, N, K]
      return nn.with_logical_constraint(y, ("act_batch", "act_len", "act_heads", "act_kv"))

    q, key, v = proj("q"), proj("k"), proj("v")
    y = jax.nn.dot_product_attention(q, key, v, is_causal=self.causal)  # [B, T, N, K]
    y = nn.with_logical_constraint(y, ("act_batch", "act_len", "act_heads", "act_kv"))
    wo = self._param("o", (n, k, d), ("heads", "kv", "embed"), self.out_std)
    return jnp.einsum("BTNK,NKD->BTD", y, wo) + self._param("o_bias", (d,), ("embed",))


class Mlp(nn.Module):
  """`fc2(act(fc1(x)))` with biases. x: `[B, T, D]`; hidden `[B, T, F]`."""
  mlp_dim: int
  act: str
  fc1_std: float
  fc2_std: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.act not in ACTIVATIONS:
      raise ValueError(f"act={self.act!r} unknown; expected one of {sorted(ACTIVATIONS)}")

    def dense(features, axes, std, name):
      return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))

    h = dense(self.mlp_dim, ("embed", "mlp"), self.fc1_std, "fc1")(x)  # [B, T, F]
    h = nn.with_logical_constraint(ACTIVATIONS[self.act](h), ("act_batch", "act_len", "act_mlp"))
    return dense(x.shape[-1], ("mlp", "embed"), self.fc2_std, "fc2")(h)  # [B, T, D]


class Block(nn.Module):
  """Pre-LN residual block. x: `[B, T, D]` -> `[B, T, D]`."""
  num_heads: int
  mlp_dim: int
  act: str
  causal: bool
  depth: int  # of the tower, for the init stds
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    in_std = d ** -0.5 * (2 * self.depth) ** -0.5
    h = layer_norm(self.norm_eps, name="ln_1", **kw)(x)
    h = Attention(self.num_heads, self.causal, in_std, d ** -0.5, name="attn", **kw)(h)
    x = nn.with_logical_constraint(x + h, _EDGE)
    h = layer_norm(self.norm_eps, name="ln_2", **kw)(x)
    h = Mlp(self.mlp_dim, self.act, (2 * d) ** -0.5, in_std, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x + h, _EDGE)


class Transformer(nn.Module):
  """`depth` blocks `blocks_{i}`. x: `[B, T, D]` -> `[B, T, D]` (no final norm)."""
  depth: int
  num_heads: int
  mlp_dim: int
  act: str
  causal: bool
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim, self.act, self.causal, self.depth, self.norm_eps,
                self.dtype, self.param_dtype, name=f"blocks_{i}")(x)
    return x
