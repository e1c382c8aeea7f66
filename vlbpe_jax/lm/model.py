"""Unified text+visual decoder (Llama-style) over one vocabulary `text | special | VQ | BPE`.

  model = LM(lm_config("mu", text_vocab=256, num_special=4, num_vq=64, num_bpe=64))
  params = nn.unbox(model.init(key, ids)["params"])
  logits = model.apply({"params": params}, ids)                      # [B, T, V] float32
  hidden = model.apply({"params": params}, ids, extra_embeds=q, return_hidden=True)

As a frozen backbone (BLIP3-o) the model takes extra input embeddings appended after the
tokens (`[C; Q]`) and returns the final-norm hidden states of every position; `LM.embed` gives
the token embeddings alone (`new_text_ids` rows from `new_text_embed`, config.py). Generation
passes a KV cache from `init_cache` (see generate.py).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlbpe_jax.lm import attention
from vlbpe_jax.lm import blockwise_attention
from vlbpe_jax.lm import layers
from vlbpe_jax.lm.config import LMConfig, lm_config  # noqa: F401  (re-exported)

SEGMENT_KERNELS = ("blockwise", "splash")  # attention impls taking segment ids, not a mask

_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """Pre-norm decoder layer. Returns `(x, new_layer_cache)` so that it can be scanned."""
  config: LMConfig

  @nn.compact
  def __call__(self, x, cache, cos, sin, mask, index, segment_ids, branch_ids=None):
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    h = layers.RMSNorm(c.norm_eps, name="attn_norm", **kw)(x)
    h, cache = attention.Attention(
        c.num_heads, c.num_kv_heads, c.head_dim, qk_norm=c.qk_norm, qkv_bias=c.qkv_bias,
        norm_eps=c.norm_eps, init_std=c.init_std, implementation=c.attention_impl,
        name="attn", **kw)(h, cos, sin, mask, cache, index, segment_ids, branch_ids)
    x = nn.with_logical_constraint(x + h, ("act_batch", "act_len", "act_embed"))
    h = layers.RMSNorm(c.norm_eps, name="mlp_norm", **kw)(x)
    h = layers.Mlp(c.mlp_dim, init_std=c.init_std, name="mlp", **kw)(h)
    x = nn.with_logical_constraint(x + h, ("act_batch", "act_len", "act_embed"))
    return x, cache


def init_cache(config, batch, max_len, dtype=None):
  """Empty KV cache for `max_len` slots: `{"k", "v", "valid" [B, S] bool, "index" []}`.

  k/v are `[L, B, S, Nkv, K]` arrays with scanned layers, else lists of L `[B, S, Nkv, K]`.
  """
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  if config.scan_layers:
    k = jnp.zeros((config.depth,) + shape, dtype)
    v = jnp.zeros((config.depth,) + shape, dtype)
  else:
    k = [jnp.zeros(shape, dtype) for _ in range(config.depth)]
    v = [jnp.zeros(shape, dtype) for _ in range(config.depth)]
  return {"k": k, "v": v, "valid": jnp.zeros((batch, max_len), bool),
          "index": jnp.zeros((), jnp.int32)}


class LM(nn.Module):
  """Decoder. See the module docstring; tables and heads are described in config.py."""
  config: LMConfig

  def setup(self):
    c = self.config
    table = nn.with_logical_partitioning(nn.initializers.normal(c.init_std), ("vocab", "embed"))
    pdt = jnp.dtype(c.param_dtype)
    self.text_embed = self.param("text_embed", table, (c.text_vocab, c.width), pdt)
    if c.visual_vocab:
      self.visual_embed = self.param("visual_embed", table, (c.visual_vocab, c.width), pdt)
    if not c.tie_embeddings:
      self.text_head = self.param("text_head", table, (c.text_vocab, c.width), pdt)
      if c.visual_vocab:
        self.visual_head = self.param("visual_head", table, (c.visual_vocab, c.width), pdt)
    if c.new_text_ids:  # a few rows: replicated over the vocab axis
      rows = nn.with_logical_partitioning(nn.initializers.normal(c.init_std), (None, "embed"))
      shape = (len(c.new_text_ids), c.width)
      self.new_text_embed = self.param("new_text_embed", rows, shape, pdt)
      if not c.tie_embeddings:
        self.new_text_head = self.param("new_text_head", rows, shape, pdt)
    block = Block
    if c.remat_policy != "none":
      block = nn.remat(Block, policy=_POLICIES[c.remat_policy], prevent_cse=not c.scan_layers)
    if c.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(0,) + (nn.broadcast,) * 6,
          length=c.depth, metadata_params={nn.PARTITION_NAME: "layers"})(c)
    else:
      self.layers = [block(c) for _ in range(c.depth)]
    self.final_norm = layers.RMSNorm(c.norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=pdt)

  def embed(self, input_ids):
    """input_ids: `[B, T]` int -> `[B, T, D]` in the compute dtype."""
    c = self.config
    ids = input_ids.astype(jnp.int32)
    x = jnp.take(self.text_embed, jnp.clip(ids, 0, c.text_vocab - 1), axis=0)
    if c.visual_vocab:
      vis = jnp.take(self.visual_embed, jnp.clip(ids - c.text_vocab, 0, c.visual_vocab - 1),
                     axis=0)
      x = jnp.where((ids >= c.text_vocab)[..., None], vis, x)
    if c.new_text_ids:
      hit = ids[..., None] == jnp.asarray(c.new_text_ids)  # [B, T, n]
      new = jnp.take(self.new_text_embed, jnp.argmax(hit, axis=-1), axis=0)  # [B, T, D]
      x = jnp.where(hit.any(axis=-1)[..., None], new, x)
    return nn.with_logical_constraint(x.astype(c.dtype), ("act_batch", "act_len", "act_embed"))

  def logits(self, h):
    """h: `[B, T, D]` final hidden -> `[B, T, V]` float32 (text columns first)."""
    c = self.config
    heads = ([self.text_embed] + ([self.visual_embed] if c.visual_vocab else [])
             if c.tie_embeddings else
             [self.text_head] + ([self.visual_head] if c.visual_vocab else []))
    # One [V, D] table (cheaper than concatenating [B, T, V] logits when B * T > D).
    w = jnp.concatenate([x.astype(c.dtype) for x in heads])  # [V, D]
    if c.new_text_ids:
      new = self.new_text_embed if c.tie_embeddings else self.new_text_head
      w = w.at[jnp.asarray(c.new_text_ids)].set(new.astype(c.dtype))
    out = jnp.einsum("BTD,VD->BTV", h, w).astype(jnp.float32)
    return nn.with_logical_constraint(out, ("act_batch", "act_len", "act_vocab"))

  def __call__(self, input_ids, positions=None, segment_ids=None, extra_embeds=None,
               return_hidden=False, cache=None, branch_ids=None):
    """Forward pass.

    input_ids: `[B, T]` int32. positions: `[B, T']` (1D RoPE) or `[B, T', 2]` (2D RoPE),
    default `0..T'-1` (offset by the cache index when decoding), where `T' = T + E`.
    segment_ids: `[B, T']` int; without a cache tokens attend only within their segment
    (packed rows); with a cache, 0 marks padding that no query may attend to.
    extra_embeds: `[B, E, D]` appended after the token embeddings.
    branch_ids: `[B, T']` int, with segment_ids and no cache: a token of branch k > 0 attends
    to branch 0 (the shared prefix, e.g. an image) and to branch k only, so one image carries
    several questions that cannot read each other (positions are the caller's: each branch
    usually restarts where the prefix ends).
    Returns logits `[B, T', V]` float32, or the final-norm hidden `[B, T', D]` when
    `return_hidden`; with a cache, `(that, new_cache)`.
    """
    c = self.config
    chex.assert_rank(input_ids, 2)
    x = self.embed(input_ids)
    if extra_embeds is not None:
      chex.assert_shape(extra_embeds, (x.shape[0], None, c.width))
      x = jnp.concatenate([x, extra_embeds.astype(x.dtype)], axis=1)
    b, t = x.shape[:2]
    if segment_ids is not None:
      chex.assert_shape(segment_ids, (b, t))
    index = None if cache is None else cache["index"]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t)[None] + (0 if index is None else index), (b, t))
    cos, sin = layers.rope_angles(positions, c.head_dim, c.rope_theta, c.rope_scaling)
    mask, valid = None, None
    if branch_ids is not None:
      if segment_ids is None or cache is not None:
        raise ValueError("branch_ids: expected segment_ids and no cache (training rows)")
      chex.assert_shape(branch_ids, (b, t))
    if cache is None and segment_ids is not None and c.attention_impl not in SEGMENT_KERNELS:
      mask = blockwise_attention.same_context(segment_ids, segment_ids, branch_ids,
                                              branch_ids)[:, None]  # [B, 1, T, T]
    elif cache is not None:
      new = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
      valid = jax.lax.dynamic_update_slice(cache["valid"], new, (0, index))  # [B, S]
      slots = jnp.arange(valid.shape[1])
      causal = slots[None, :] <= (index + jnp.arange(t))[:, None]  # [T, S]
      mask = valid[:, None, None, :] & causal[None, None]  # [B, 1, T, S]
    if c.scan_layers:
      kv = None if cache is None else (cache["k"], cache["v"])
      x, kv = self.layers(x, kv, cos, sin, mask, index, segment_ids, branch_ids)
      new_k, new_v = (None, None) if kv is None else kv
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        x, kv = layer(x, None if cache is None else (cache["k"][i], cache["v"][i]),
                      cos, sin, mask, index, segment_ids, branch_ids)
        if kv is not None:
          new_k.append(kv[0])
          new_v.append(kv[1])
    h = self.final_norm(x)
    out = h if return_hidden else self.logits(h)
    if cache is None:
      return out
    return out, {"k": new_k, "v": new_v, "valid": valid, "index": index + t}


def stack_layers(params, depth):
  """`layers_0..layers_{L-1}` -> one `layers` stack (the scanned layout)."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[params[f"layers_{i}"] for i in range(depth)])
  return out


def unstack_layers(params, depth):
  """Inverse of `stack_layers`."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(depth):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out
