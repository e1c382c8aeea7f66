"""Attention kernels (blockwise; splash in Pallas interpret mode) equal
`jax.nn.dot_product_attention` in values and gradients, in the model and sharded too."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlbpe_jax import parallel
from vlbpe_jax.lm import model as lm_model
from vlbpe_jax.lm.blockwise_attention import blockwise_attention
from vlbpe_jax.lm.splash import splash_attention


def _inputs(b=2, t=37, n=4, nkv=2, k=8, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, n, k), dtype)
  kk = jax.random.normal(keys[1], (b, t, nkv, k), dtype)
  v = jax.random.normal(keys[2], (b, t, nkv, k), dtype)
  seg = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (b, t)), axis=1))
  return q, kk, v, seg, jax.random.normal(keys[3], q.shape, dtype)


def _reference(q, k, v, seg):
  mask = None if seg is None else (seg[:, :, None] == seg[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)


@pytest.mark.parametrize("block,segments,nkv", [
    (8, True, 2),  # ragged last block (37 = 4 * 8 + 5), packed segments, GQA
    (16, False, 1),  # multi-query
    (37, True, 4),  # one block, multi-head
    (64, False, 2),  # block longer than the sequence
])
def test_values_and_grads_match_reference(block, segments, nkv):
  q, k, v, seg, dout = _inputs(nkv=nkv)
  _assert_matches_reference(lambda *a: blockwise_attention(*a, block=block), q, k, v,
                            seg if segments else None, dout, atol=2e-5)


def test_splash_matches_reference():
  q, k, v, seg, dout = _inputs(t=256, k=16)
  _assert_matches_reference(splash_attention, q, k, v, seg, dout, atol=5e-5)


def _assert_matches_reference(kernel, q, k, v, seg, dout, atol):
  @jax.jit
  def both(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, seg), q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, seg), q, k, v)
    return out, ref, vjp(dout), ref_vjp(dout)

  out, ref, grads, ref_grads = both(q, k, v)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=atol)


def test_bfloat16_close_to_float32():
  q, k, v, seg, _ = _inputs()
  out = jax.jit(blockwise_attention)(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), _reference(q, k, v, seg), atol=5e-2)


def test_bad_shapes_raise():
  q, k, v, seg, _ = _inputs(n=4, nkv=2)
  with pytest.raises(ValueError, match="multiple of Nkv"):
    blockwise_attention(q[:, :, :3], k, v)
  with pytest.raises(ValueError, match="self-attention"):
    blockwise_attention(q, k[:, :5], v[:, :5])
  with pytest.raises(ValueError, match="block=0"):
    blockwise_attention(q, k, v, block=0)
  with pytest.raises(ValueError, match="T=37"):  # splash needs T % 128 == 0
    splash_attention(q, k, v)


def test_model_with_blockwise_attention_matches_default():
  cfg = dict(text_vocab=40, num_special=2, num_vq=8, num_bpe=6, dtype="float32")
  model = lm_model.LM(lm_model.lm_config("mu", **cfg))
  fast = lm_model.LM(lm_model.lm_config("mu", attention_impl="blockwise", scan_layers=True, **cfg))
  ids = jax.random.randint(jax.random.key(1), (2, 70), 0, 56)
  seg = jnp.asarray([[1] * 30 + [2] * 40, [1] * 69 + [0]])
  params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
  sparams = lm_model.stack_layers(params, model.config.depth)
  loss = lambda m, p: jnp.mean(m.apply({"params": p}, ids, segment_ids=seg) ** 2)
  np.testing.assert_allclose(jax.jit(loss, static_argnums=0)(fast, sparams),
                             jax.jit(loss, static_argnums=0)(model, params), rtol=1e-5)
  g = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
  gs = jax.jit(jax.grad(lambda p: loss(fast, p)))(sparams)
  np.testing.assert_allclose(gs["layers"]["attn"]["k"][0], g["layers_0"]["attn"]["k"],
                             rtol=1e-4, atol=1e-8)


def test_sharded_model_with_splash_matches_default():
  cfg = dict(width=32, num_heads=4, num_kv_heads=2, mlp_dim=64, text_vocab=40, num_special=2,
             num_vq=4, num_bpe=2, dtype="float32")
  model = lm_model.LM(lm_model.lm_config("mu", **cfg))
  fast = lm_model.LM(lm_model.lm_config("mu", attention_impl="splash", **cfg))
  ids = jax.random.randint(jax.random.key(1), (4, 128), 0, 48)
  seg = jnp.broadcast_to(jnp.where(jnp.arange(128) < 50, 1, 2), (4, 128))
  params = nn.unbox(model.init(jax.random.key(0), ids[:, :4])["params"])
  loss = lambda m, p, ids, seg: jnp.mean(m.apply({"params": p}, ids, segment_ids=seg) ** 2)
  ref, ref_grad = jax.jit(jax.value_and_grad(lambda p: loss(model, p, ids, seg)))(params)
  mesh = parallel.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    batch = parallel.shard_batch({"ids": np.asarray(ids), "seg": np.asarray(seg)}, mesh)
    val, grad = jax.jit(jax.value_and_grad(
        lambda p, b: loss(fast, p, b["ids"], b["seg"])))(params, batch)
  np.testing.assert_allclose(val, ref, rtol=1e-5)
  np.testing.assert_allclose(grad["layers_0"]["attn"]["q"], ref_grad["layers_0"]["attn"]["q"],
                             rtol=1e-4, atol=1e-8)
