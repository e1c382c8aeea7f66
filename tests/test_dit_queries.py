"""BLIP3-o conditioning: learnable queries through a frozen backbone (dit/queries.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlbpe_jax.dit import queries as queries_lib
from vlbpe_jax.lm import model as lm_model


def _lm(impl="xla"):
  cfg = lm_model.lm_config("mu", text_vocab=40, width=32, num_heads=2, num_kv_heads=2,
                           mlp_dim=64, depth=2, dtype="float32", attention_impl=impl)
  lm = lm_model.LM(cfg)
  params = lm.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return lm, params


def _encode(text):
  return [3 + (ord(ch) % 30) for ch in text]


def test_encode_prompts_left_pads_and_rejects_bad_prompts():
  ids, mask = queries_lib.encode_prompts(_encode, ["ab", "abcd"], template="<{caption}>",
                                         max_len=8, bos_id=1)
  assert ids.shape == (2, 8) and mask.sum(1).tolist() == [5, 7]
  assert ids[0, :3].tolist() == [0, 0, 0] and ids[0, 3] == 1 and mask[0, 3:].all()
  with pytest.raises(ValueError, match="caption 1"):
    queries_lib.encode_prompts(_encode, ["ok", "  "], template="{caption}", max_len=8)
  with pytest.raises(ValueError, match="max_len=4"):
    queries_lib.encode_prompts(_encode, ["too long a caption"], template="{caption}", max_len=4)
  with pytest.raises(ValueError, match="non-empty list"):
    queries_lib.encode_prompts(_encode, "a string", template="{caption}", max_len=8)
  with pytest.raises(ValueError, match="caption"):
    queries_lib.encode_prompts(_encode, ["x"], template="no field", max_len=8)


def test_query_states_ignore_padding():
  lm, params = _lm("blockwise")  # the demo LM's attention
  q = jax.random.normal(jax.random.key(1), (3, 32))
  short = queries_lib.encode_prompts(_encode, ["red circle"], template="{caption}", max_len=12)
  long = queries_lib.encode_prompts(_encode, ["red circle"], template="{caption}", max_len=20)
  a = queries_lib.query_states(lm, params, q, *short)
  b = queries_lib.query_states(lm, params, q, *long)
  assert a.shape == (1, 3, 32)
  np.testing.assert_allclose(a, b, atol=1e-5)
  other = queries_lib.encode_prompts(_encode, ["blue square"], template="{caption}", max_len=12)
  assert np.abs(queries_lib.query_states(lm, params, q, *other) - a).max() > 1e-3


def _one_pass(lm, params, q, ids, mask):
  """Reference: the backbone over [prompt; queries] in one pass, padding as its own segment."""
  b, n = ids.shape[0], q.shape[0]
  seg = jnp.concatenate([mask, jnp.ones((b, n), bool)], axis=1).astype(jnp.int32)
  pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
  h = lm.apply({"params": params}, ids, positions=pos, segment_ids=seg,
               extra_embeds=jnp.broadcast_to(q[None], (b,) + q.shape), return_hidden=True)
  return h[:, -n:]


def test_cached_prompt_equals_one_pass_values_and_gradients():
  lm, params = _lm()
  q = jax.random.normal(jax.random.key(1), (3, 32))
  ids, mask = queries_lib.encode_prompts(_encode, ["red circle", "a blue star"],
                                         template="{caption}", max_len=14)
  np.testing.assert_allclose(queries_lib.query_states(lm, params, q, ids, mask),
                             _one_pass(lm, params, q, ids, mask), atol=1e-5)
  loss = lambda f: lambda q: jnp.sum(jnp.sin(f(lm, params, q, ids, mask)))  # noqa: E731
  np.testing.assert_allclose(jax.grad(loss(queries_lib.query_states))(q),
                             jax.grad(loss(_one_pass))(q), atol=1e-4)


def test_training_moves_queries_not_backbone():
  lm, params = _lm()
  before = jax.tree.map(np.array, params)
  ids, mask = queries_lib.encode_prompts(_encode, ["red circle", "blue star"],
                                         template="{caption}", max_len=12)
  target = jax.random.normal(jax.random.key(2), (2, 3, 32))
  q = {"queries": jax.random.normal(jax.random.key(1), (3, 32))}
  tx = optax.adam(1e-2)
  opt = tx.init(q)

  def loss(q, backbone):
    return jnp.mean((queries_lib.query_states(lm, backbone, q["queries"], ids, mask)
                     - target) ** 2)

  losses = []
  for _ in range(5):
    value, grads = jax.value_and_grad(loss)(q, params)
    updates, opt = tx.update(grads, opt, q)
    q = optax.apply_updates(q, updates)
    losses.append(float(value))
  assert losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, params))
  backbone_grads = jax.grad(loss, argnums=1)(q, params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(backbone_grads))
