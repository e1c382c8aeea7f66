"""Staged unfreezing: frozen leaves bit-identical, first layers only, clip norm, migration."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlbpe_jax.lm import model as lm_model
from vlbpe_jax.lm import stages

DEPTH = 3  # stage 2 unfreezes ceil(0.25 * 3) = 1 layer


@functools.cache
def make(scan=False):
  cfg = lm_model.lm_config("mu", width=32, num_heads=2, num_kv_heads=1, mlp_dim=64, depth=DEPTH,
                           text_vocab=32, num_special=2, num_vq=6, num_bpe=4,
                           dtype="float32", scan_layers=scan)
  model = lm_model.LM(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  return model, params["params"]


@functools.cache
def optimizer(stage, scan=False):
  """One optimizer per (stage, layout), so that jitted steps are shared between tests."""
  return stages.make_optimizer(stage, make(scan)[1], 1e-2, clip=1.0, weight_decay=0.1)


def batch(step):
  ids = jax.random.randint(jax.random.key(100 + step), (4, 9), 0, 44)
  return ids[:, :-1], ids[:, 1:]


def loss_fn(model, params, inputs, targets):
  logits = model.apply({"params": params}, inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@functools.cache
def step_fn(model, tx):
  @jax.jit
  def step(params, opt, inputs, targets):
    grads = jax.grad(functools.partial(loss_fn, model))(params, inputs, targets)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt
  return step


def run(model, params, tx, steps, opt=None, start=0):
  opt = tx.init(params) if opt is None else opt
  for i in range(start, start + steps):
    params, opt = step_fn(model, tx)(params, opt, *batch(i))
  return params, opt


def changed(a, b):
  return jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))), a, b)


def test_labels_and_first_layer_counts():
  _, params = make()
  labels = stages.param_labels(params, 1, DEPTH)
  assert labels["visual_embed"] == "trainable" and labels["visual_head"] == "trainable"
  assert labels["text_embed"] == "frozen" and labels["layers_0"]["attn"]["q"] == "frozen"
  labels = stages.param_labels(params, 2, DEPTH)
  assert labels["layers_0"]["attn"]["q"] == "trainable"
  assert labels["layers_1"]["attn"]["q"] == "frozen" and labels["text_head"] == "frozen"
  assert set(jax.tree.leaves(stages.param_labels(params, 3, DEPTH))) == {"trainable"}
  assert [stages.num_first_layers(n) for n in (1, 3, 4, 5, 8, 32)] == [1, 1, 1, 2, 2, 8]
  assert stages.num_first_layers(16, 0.5) == 8
  with pytest.raises(ValueError, match="stage"):
    stages.param_labels(params, 4, DEPTH)
  with pytest.raises(ValueError, match="first_frac"):
    stages.num_first_layers(8, 1.5)
  _, sparams = make(scan=True)
  counts = [stages.trainable_count(p, s) for p in (params, sparams) for s in (1, 2, 3)]
  assert counts[:3] == counts[3:] and counts[0] < counts[1] < counts[2]
  assert counts[0] == 2 * 12 * 32 and counts[2] == sum(x.size for x in jax.tree.leaves(params))


def test_stage1_moves_only_visual_rows():
  model, params = make()
  new, _ = run(model, params, optimizer(1), 3)
  diff = changed(params, new)
  assert diff.pop("visual_embed") and diff.pop("visual_head")
  assert not any(jax.tree.leaves(diff))  # every other leaf bit-identical


@pytest.mark.parametrize("scan", [False, True])
def test_stage2_changes_exactly_the_first_layers(scan):
  model, params = make(scan)
  new, _ = run(model, params, optimizer(2, scan), 2)
  if scan:
    per_layer = [changed(jax.tree.map(lambda x: x[i], params["layers"]),
                         jax.tree.map(lambda x: x[i], new["layers"])) for i in range(DEPTH)]
  else:
    per_layer = [changed(params[f"layers_{i}"], new[f"layers_{i}"]) for i in range(DEPTH)]
  assert all(jax.tree.leaves(per_layer[0]))  # every leaf of layer 0 trained
  assert not any(jax.tree.leaves(per_layer[1:]))
  diff = changed(params, new)
  assert diff["visual_embed"] and diff["visual_head"]
  assert not any(diff[k] for k in ("text_embed", "text_head"))
  assert not any(jax.tree.leaves(diff["final_norm"]))


def adam_mu(opt_state):
  return opt_state.inner_states["trainable"].inner_state[2][0].mu


@pytest.mark.parametrize("scan", [False, True])
def test_clipping_ignores_frozen_gradients(scan):
  _, params = make(scan)
  stage = 1 if not scan else 2  # with scan: frozen slices of the layer stack
  tx = stages.make_optimizer(stage, params, 1e-3, clip=1.0)
  labels = stages.param_labels(params, stage, DEPTH)
  small = jax.tree.map(lambda x: jnp.full_like(x, 1e-4), params)
  huge = jax.tree.map(lambda x, l: jnp.full_like(x, 1e4 if l == "frozen" else 1e-4),
                      params, labels)
  if scan:  # frozen layers 1.. of the stack get huge gradients, layer 0 small ones
    huge["layers"] = jax.tree.map(lambda x: x.at[1:].set(1e4), huge["layers"])
  opt = tx.init(params)
  up_small, st_small = tx.update(small, opt, params)
  up_huge, st_huge = tx.update(huge, opt, params)
  chex.assert_trees_all_close(up_huge, up_small)
  mu = adam_mu(st_huge)["visual_embed"]
  np.testing.assert_allclose(mu, 0.1 * 1e-4, rtol=1e-6)  # unclipped: trainable norm < 1
  frozen = jax.tree.map(lambda u, l: None if l == "trainable" else u, up_huge, labels)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(frozen))


@pytest.mark.parametrize("scan", [False, True])
def test_migration_keeps_moments(scan):
  model, params = make(scan)
  tx1 = optimizer(1, scan)
  params, opt1 = run(model, params, tx1, 2)
  tx2 = optimizer(2, scan)
  restored = jax.tree.map(np.asarray, opt1)  # host copy, as after a checkpoint restore
  opt2 = stages.migrate_opt_state(restored, 1, 2, params, tx2)
  for name in ("mu", "nu"):
    old = getattr(opt1.inner_states["trainable"].inner_state[2][0], name)
    new = getattr(opt2.inner_states["trainable"].inner_state[2][0], name)
    np.testing.assert_array_equal(new["visual_embed"], old["visual_embed"])
    assert np.abs(old["visual_embed"]).max() > 0
    first = new["layers"] if scan else new["layers_0"]
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(first))  # fresh
  assert int(opt2.inner_states["trainable"].inner_state[2][0].count) == 0
  params2, opt2 = run(model, params, tx2, 1, opt2, start=2)
  tx3 = optimizer(3, scan)
  opt3 = stages.migrate_opt_state(opt2, 2, 3, params2, tx3, keep_count=True)
  mu2 = adam_mu(opt2)
  mu3 = adam_mu(opt3)
  first = "layers" if scan else "layers_0"
  chex.assert_trees_all_equal(mu3[first], mu2[first])
  assert int(opt3.inner_states["trainable"].inner_state[2][0].count) == 1
  with pytest.raises(ValueError, match="only unfreeze"):
    stages.migrate_opt_state(opt2, 2, 1, params2, tx1)
