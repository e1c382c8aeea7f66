"""Staged unfreezing: frozen leaves bit-identical, first layers only, clip norm, migration."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlbpe_jax.lm import adam
from vlbpe_jax.lm import model as lm_model
from vlbpe_jax.lm import stages

DEPTH = 3  # stage 2 unfreezes ceil(0.25 * 3) = 1 layer
NEW_TEXT_IDS = (4, 5)  # text ids with new rows (as <img> </img>), trained from stage 1


@functools.cache
def make(scan=False):
  cfg = lm_model.lm_config("mu", width=32, num_heads=2, num_kv_heads=1, mlp_dim=64, depth=DEPTH,
                           text_vocab=32, num_special=2, num_vq=6, num_bpe=4,
                           new_text_ids=NEW_TEXT_IDS,
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
  assert labels["new_text_embed"] == "trainable" and labels["new_text_head"] == "trainable"
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
  assert counts[0] == 2 * (12 + 2) * 32  # visual + new-text rows, embed and head
  assert counts[2] == sum(x.size for x in jax.tree.leaves(params))


def test_stage1_moves_only_new_rows():
  model, params = make()
  new, _ = run(model, params, optimizer(1), 3)
  diff = changed(params, new)
  assert diff.pop("visual_embed") and diff.pop("visual_head")
  assert diff.pop("new_text_embed") and diff.pop("new_text_head")
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
  count = opt2.inner_states["trainable"].inner_state[2][0].count  # per leaf, carried
  assert int(count["visual_embed"]) == 2
  new_counts = count["layers"] if scan else count["layers_0"]  # newly trainable: fresh
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(new_counts))
  params2, opt2 = run(model, params, tx2, 1, opt2, start=2)
  tx3 = optimizer(3, scan)
  opt3 = stages.migrate_opt_state(opt2, 2, 3, params2, tx3)
  mu2 = adam_mu(opt2)
  mu3 = adam_mu(opt3)
  first = "layers" if scan else "layers_0"
  chex.assert_trees_all_equal(mu3[first], mu2[first])
  count3 = opt3.inner_states["trainable"].inner_state[2][0].count
  assert int(count3["visual_embed"]) == 3
  if scan:  # layer 0 trained 1 step in stage 2; the other slices start fresh
    assert [int(c) for c in jax.tree.leaves(count3["layers"])[0].ravel()] == [1, 0, 0]
  else:
    assert int(jax.tree.leaves(count3["layers_0"])[0]) == 1
    assert int(jax.tree.leaves(count3["layers_1"])[0]) == 0
  with pytest.raises(ValueError, match="only unfreeze"):
    stages.migrate_opt_state(opt2, 2, 1, params2, tx1)



def adam_bound(n, b1, b2):
  """Adam's own bound on max |update| / lr after n steps (Cauchy-Schwarz over the gradient
  history; about 1.002 for n=4 at b1=0.9, b2=0.95): a carried leaf continuing its optimizer may
  exceed a fresh step by this much, never by the 1.6-2.2x of restarting the count."""
  k = np.arange(n)
  w = (1 - b1) * b1 ** k / (1 - b1 ** n)
  u = (1 - b2) * b2 ** k / (1 - b2 ** n)
  return float(np.sqrt(np.sum(w ** 2 / u)))


def parts_by_origin(labels_old, labels_new, trees, scan, old_stage):
  """(carried, [leaf part of each tree]) for every part trainable in the new stage; a scanned
  stack trained in stage 2 splits into its first slices (carried) and the rest (new)."""
  n_first = stages.num_first_layers(DEPTH)
  out = []
  for path, label in jax.tree_util.tree_flatten_with_path(labels_new)[0]:
    if label == "frozen":
      continue
    at = lambda t, p=path: functools.reduce(lambda t, k: t[k.key], p, t)  # noqa: E731
    was = at(labels_old) == "trainable"
    leaves = [at(t) for t in trees]
    if scan and path[0].key == "layers" and was and old_stage == 2:
      out.append((True, [x[:n_first] for x in leaves]))
      out.append((False, [x[n_first:] for x in leaves]))
    else:
      out.append((was, leaves))
  return out


@pytest.mark.parametrize("b2", [0.95, 0.999])
@pytest.mark.parametrize("scan", [False, True])
def test_first_update_after_migration_is_never_larger_than_a_fresh_step(scan, b2):
  """Stage 1 -> 2 -> 3 at the boundaries, on a host copy of the state (as after a checkpoint
  restore): leaves trained before continue their optimizer exactly; leaves (and scanned layer
  slices) newly trainable take exactly a fresh Adam step."""
  model, params = make(scan)
  lr, b1, steps = 1e-2, 0.9, 3
  txs = {s: stages.make_optimizer(s, params, lr, clip=None, b2=b2) for s in (1, 2, 3)}
  grad = jax.jit(jax.grad(functools.partial(loss_fn, model)))
  opt, step = txs[1].init(params), 0
  for old, new in ((1, 2), (2, 3)):
    for _ in range(steps):  # train the old stage
      updates, opt = txs[old].update(grad(params, *batch(step)), opt, params)
      params, step = optax.apply_updates(params, updates), step + 1
    g = grad(params, *batch(step))
    migrated = stages.migrate_opt_state(jax.tree.map(np.asarray, opt), old, new, params,
                                        txs[new])
    up, _ = txs[new].update(g, migrated, params)
    fresh, _ = txs[new].update(g, txs[new].init(params), params)
    cont, _ = txs[old].update(g, opt, params)
    labels = [stages.param_labels(params, s, DEPTH) for s in (old, new)]
    for carried, (u, c, f) in parts_by_origin(*labels, (up, cont, fresh), scan, old):
      size, fresh_size = float(jnp.abs(u).max()) / lr, float(jnp.abs(f).max()) / lr
      if carried:  # what the old optimizer would do: Adam's own bound, not a restart's 2.2x
        np.testing.assert_allclose(u, c, rtol=1e-5, atol=1e-9)
        assert size <= fresh_size * adam_bound(steps + 1, b1, b2) * (1 + 1e-5), (old, size)
      else:
        np.testing.assert_allclose(u, f, rtol=1e-5, atol=1e-9)
        assert size <= fresh_size * (1 + 1e-5), (old, size, fresh_size)
    opt = migrated


def test_per_leaf_count_adam_matches_optax_adam():
  tree = {"a": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "layers": jnp.ones((3, 2))}
  ours = adam.scale_by_adam(0.9, 0.95, stacked=lambda path: path[0].key == "layers")
  ref = optax.scale_by_adam(0.9, 0.95)
  s_ours, s_ref = ours.init(tree), ref.init(tree)
  assert s_ours.count["layers"].shape == (3, 1) and s_ours.count["a"].shape == ()
  for i in range(3):
    g = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1.0)) + 0.1 * i, tree)
    u_ours, s_ours = ours.update(g, s_ours)
    u_ref, s_ref = ref.update(g, s_ref)
    chex.assert_trees_all_close(u_ours, u_ref, rtol=1e-6)
