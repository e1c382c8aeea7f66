"""Splash attention (Pallas TPU kernel, interpret mode on CPU) equals the reference, sharded too."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlbpe_jax import parallel
from vlbpe_jax.lm import model as lm_model
from vlbpe_jax.lm.splash import splash_attention


def _reference(q, k, v, seg):
  mask = (seg[:, :, None] == seg[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)


def test_values_and_grads_match_reference():
  b, t, n, nkv, d = 2, 256, 4, 2, 16
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, n, d))
  k = jax.random.normal(keys[1], (b, t, nkv, d))
  v = jax.random.normal(keys[2], (b, t, nkv, d))
  dout = jax.random.normal(keys[3], q.shape)
  seg = jnp.asarray(np.sort(np.random.default_rng(0).integers(1, 4, (b, t)), axis=1))

  @jax.jit
  def both(q, k, v):
    out, vjp = jax.vjp(lambda *a: splash_attention(*a, seg), q, k, v)
    ref, ref_vjp = jax.vjp(lambda *a: _reference(*a, seg), q, k, v)
    return out, ref, vjp(dout), ref_vjp(dout)

  out, ref, grads, ref_grads = both(q, k, v)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=5e-5)


def test_length_not_divisible_raises():
  x = jnp.zeros((1, 100, 2, 8))
  with pytest.raises(ValueError, match="T=100"):
    splash_attention(x, x, x)


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
