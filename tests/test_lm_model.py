"""Unified LM decoder: shapes, layer scan, packing, visual rows, 2D RoPE, backbone mode."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlbpe_jax.lm import layers
from vlbpe_jax.lm import model as lm_model

V_TEXT, N_SPECIAL, N_VQ, N_BPE = 40, 2, 8, 6


def config(**kw):
  return lm_model.lm_config("mu", text_vocab=V_TEXT, num_special=N_SPECIAL, num_vq=N_VQ,
                            num_bpe=N_BPE, dtype="float32", **kw)


@functools.cache
def _init():
  model = lm_model.LM(config())
  ids = jnp.zeros((1, 4), jnp.int32)
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(0), ids)["params"])


def make(**kw):
  """The base model's params (one init per test run), adapted to the variant asked for."""
  model, params = _init()
  model = lm_model.LM(config(**kw))
  if model.config.tie_embeddings:
    params = {k: v for k, v in params.items() if not k.endswith("_head")}
  if model.config.scan_layers:
    params = lm_model.stack_layers(params, model.config.depth)
  return model, params


@functools.cache
def jit_apply(model):
  return jax.jit(model.apply, static_argnames=("return_hidden", "method"))


def ids_for(key, b, t):
  return jax.random.randint(key, (b, t), 0, V_TEXT + N_SPECIAL + N_VQ + N_BPE)


def test_shapes_dtypes_and_determinism():
  model, params = make()
  ids = ids_for(jax.random.key(1), 2, 7)
  logits = jit_apply(model)({"params": params}, ids)
  assert logits.shape == (2, 7, V_TEXT + N_SPECIAL + N_VQ + N_BPE)
  assert logits.dtype == jnp.float32
  assert params["visual_embed"].shape == (N_SPECIAL + N_VQ + N_BPE, 64)
  params2 = nn.unbox(jax.jit(model.init)(jax.random.key(0), ids[:, :4])["params"])
  chex.assert_trees_all_equal(params, params2)  # same key -> same params
  bf16 = lm_model.LM(dataclasses.replace(model.config, dtype="bfloat16"))
  out = jit_apply(bf16)({"params": params}, ids)
  assert out.dtype == jnp.float32 and params["text_embed"].dtype == jnp.float32
  np.testing.assert_allclose(out, logits, atol=5e-2)


def test_every_param_has_logical_names():
  model, _ = make(scan_layers=True)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  names = {n for x in leaves for n in x.names}
  assert {"layers", "embed", "vocab", "heads", "kv_heads", "kv", "mlp", "norm"} <= names


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_and_remat_match_unrolled(remat):
  model, params = make()
  ids = ids_for(jax.random.key(2), 2, 6)
  scanned, sparams = make(scan_layers=True, remat_policy=remat)
  loss = lambda m, p: jnp.mean(jit_apply(m)({"params": p}, ids) ** 2)
  np.testing.assert_allclose(loss(scanned, sparams), loss(model, params), rtol=1e-5)
  g = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
  gs = jax.jit(jax.grad(lambda p: loss(scanned, p)))(sparams)
  np.testing.assert_allclose(gs["layers"]["mlp"]["up"]["kernel"][1],
                             g["layers_1"]["mlp"]["up"]["kernel"], rtol=1e-4, atol=1e-7)


def test_packed_segments_equal_separate_rows():
  model, params = make()
  a, b = ids_for(jax.random.key(3), 1, 5), ids_for(jax.random.key(4), 1, 3)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 5 + [2] * 3])
  pos = jnp.array([list(range(5)) + list(range(3))])
  out = jit_apply(model)({"params": params}, packed, positions=pos, segment_ids=seg)
  np.testing.assert_allclose(out[:, :5], jit_apply(model)({"params": params}, a), atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], jit_apply(model)({"params": params}, b), atol=1e-5)


def test_visual_ids_read_the_visual_table():
  model, params = make()
  ids = jnp.array([[3, 4, V_TEXT + 5, 6, 7]])
  base = jit_apply(model)({"params": params}, ids)
  bumped = dict(params, visual_embed=params["visual_embed"].at[5].add(1.0))
  out = jit_apply(model)({"params": bumped}, ids)
  np.testing.assert_array_equal(out[:, :2], base[:, :2])  # causal: earlier tokens unchanged
  assert np.abs(out[:, 2:] - base[:, 2:]).min() > 0
  bumped = dict(params, text_embed=params["text_embed"].at[V_TEXT - 1].add(1.0))
  np.testing.assert_array_equal(jit_apply(model)({"params": bumped}, ids), base)


@pytest.mark.parametrize("tie", [False, True])
def test_new_text_ids_read_the_new_text_rows(tie):
  """`<img>`-like ids: embedding and head row from `new_text_*`; their text rows get no gradient."""
  model = lm_model.LM(config(new_text_ids=(5, 9), tie_embeddings=tie))
  ids = jnp.array([[3, 5, 9, V_TEXT + 2, 9]])
  params = nn.unbox(jax.jit(model.init)(jax.random.key(3), ids)["params"])
  assert params["new_text_embed"].shape == (2, 64)
  assert ("new_text_head" in params) == (not tie)
  emb = jit_apply(model)({"params": params}, ids, method=lm_model.LM.embed)
  np.testing.assert_array_equal(emb[0, [1, 2, 4]], params["new_text_embed"][jnp.array([0, 1, 1])])
  np.testing.assert_array_equal(emb[0, 0], params["text_embed"][3])
  h = jit_apply(model)({"params": params}, ids, return_hidden=True)
  logits = jit_apply(model)({"params": params}, ids)
  head = params["new_text_embed" if tie else "new_text_head"]
  np.testing.assert_allclose(logits[..., jnp.array([5, 9])], h @ head.T, atol=1e-5)
  loss = lambda p: jit_apply(model)({"params": p}, ids).sum()  # noqa: E731
  g = jax.grad(loss)(params)
  for name in ("text_embed",) + (() if tie else ("text_head",)):
    assert not np.any(g[name][jnp.array([5, 9])]) and np.any(g[name]), name
  assert np.abs(g["new_text_embed"]).min() > 0
  with pytest.raises(ValueError, match="new_text_ids"):
    config(new_text_ids=(5, 5))
  with pytest.raises(ValueError, match="new_text_ids"):
    config(new_text_ids=(V_TEXT,))


def test_tied_head_has_no_head_params():
  model, params = make(tie_embeddings=True)
  assert "text_head" not in params and "visual_head" not in params
  ids = ids_for(jax.random.key(5), 1, 3)
  h = jit_apply(model)({"params": params}, ids, return_hidden=True)
  logits = jit_apply(model)({"params": params}, ids)
  table = jnp.concatenate([params["text_embed"], params["visual_embed"]])
  np.testing.assert_allclose(logits, h @ table.T, atol=1e-5)


def test_2d_rope_depends_only_on_offsets():
  key_q, key_k = jax.random.split(jax.random.key(6))
  q = jax.random.normal(key_q, (1, 3, 2, 16))
  k = jax.random.normal(key_k, (1, 3, 2, 16))
  pos = jnp.array([[[0, 0], [1, 3], [4, 2]]])

  def scores(p):
    cos, sin = layers.rope_angles(p, 16, 10_000.0)
    return jnp.einsum("BTNK,BSNK->BNTS", layers.apply_rope(q, cos, sin),
                      layers.apply_rope(k, cos, sin))

  np.testing.assert_allclose(scores(pos + jnp.array([5, 7])), scores(pos), atol=1e-4)
  swapped = scores(pos[..., ::-1])  # rows and columns rotate different dims
  assert np.abs(swapped - scores(pos)).max() > 1e-3
  with pytest.raises(ValueError, match="positions shape"):
    layers.rope_angles(jnp.zeros((1, 3, 3), jnp.int32), 16, 10_000.0)


def test_backbone_mode_with_extra_embeds():
  model, params = make()
  ids = ids_for(jax.random.key(7), 2, 5)
  extra = jax.random.normal(jax.random.key(8), (2, 3, 64))
  h = jit_apply(model)({"params": params}, ids, extra_embeds=extra, return_hidden=True)
  assert h.shape == (2, 8, 64)
  h0 = jit_apply(model)({"params": params}, ids, return_hidden=True)
  np.testing.assert_allclose(h[:, :5], h0, atol=1e-5)
  # Frozen backbone, trainable queries: gradients reach the extra embeddings.
  g = jax.jit(jax.grad(lambda e: jnp.sum(jit_apply(model)({"params": params}, ids, extra_embeds=e,
                                             return_hidden=True)[:, 5:] ** 2)))(extra)
  assert np.abs(g).min() > 0
  emb = jit_apply(model)({"params": params}, ids, method=lm_model.LM.embed)
  assert emb.shape == (2, 5, 64)


def test_config_errors():
  with pytest.raises(ValueError, match="variant"):
    lm_model.lm_config("XXL")
  with pytest.raises(ValueError, match="num_kv_heads"):
    lm_model.lm_config("mu", num_kv_heads=3)
  with pytest.raises(ValueError, match="remat_policy"):
    lm_model.lm_config("mu", remat_policy="some")
  with pytest.raises(ValueError, match="unknown"):
    lm_model.lm_config("mu", widht=3)


def test_model_accepts_2d_positions():
  model, params = make()
  ids = ids_for(jax.random.key(9), 1, 6)
  grid = jnp.array([[[0, 0], [1, 1], [2, 2], [2, 3], [3, 2], [3, 3]]])  # text diagonal, then 2x2
  out2d = jit_apply(model)({"params": params}, ids, positions=grid)
  out1d = jit_apply(model)({"params": params}, ids)
  assert out2d.shape == out1d.shape and np.isfinite(out2d).all()
  np.testing.assert_allclose(out2d[:, :3], out1d[:, :3], atol=1e-5)  # (p, p) == position p
  assert np.abs(out2d[:, 3:] - out1d[:, 3:]).max() > 1e-4
  diagonal = jnp.stack([jnp.arange(6)] * 2, axis=-1)[None]
  np.testing.assert_allclose(jit_apply(model)({"params": params}, ids, positions=diagonal),
                             out1d, atol=1e-5)
