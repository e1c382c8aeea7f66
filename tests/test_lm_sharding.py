"""The LM on a 2x2x2 (data, fsdp, tensor) fake mesh: sharded step == unsharded, AOT compile."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from vlbpe_jax import parallel
from vlbpe_jax.lm import model as lm_model
from vlbpe_jax.lm import stages

AXES = [("data", 2), ("fsdp", 2), ("tensor", 2)]


def make(scan, attention=None):
  cfg = lm_model.lm_config("mu", width=32, num_heads=4, num_kv_heads=2, mlp_dim=64, depth=4,
                           text_vocab=40, num_special=2, num_vq=4, num_bpe=2,
                           dtype="float32", scan_layers=scan, attention_impl=attention)
  return lm_model.LM(cfg)


def batch_np():
  ids = np.random.default_rng(0).integers(0, 48, (8, 17)).astype(np.int32)
  seg = np.ones((8, 16), np.int32)
  seg[:, 10:] = 2  # two packed documents per row
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": seg}


def parts(model, stage):
  """init and step functions; the optimizer is built from the abstract (boxed) params."""
  ids = jnp.zeros((1, 4), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  tx = stages.make_optimizer(stage, abstract, 1e-2, clip=1.0, weight_decay=0.1)

  def init(key):
    params = model.init(key, ids)["params"]
    return {"step": jnp.int32(0), "params": params, "opt": tx.init(params)}

  def step(state, batch):
    def loss_fn(params):
      logits = model.apply({"params": params}, batch["inputs"],
                           segment_ids=batch["segment_ids"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt": opt}, loss

  return init, step


def sharded(mesh, model, stage):
  init, step = parts(model, stage)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    shardings = parallel.logical_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    step_jit = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None),
                       donate_argnums=0)
  return nn.unbox(state), step_jit, shardings


@pytest.mark.parametrize("attention", [None, "blockwise"])
def test_sharded_step_equals_unsharded(attention):
  model = make(scan=True, attention=attention)
  mesh = parallel.make_mesh(AXES)
  state, step_jit, shardings = sharded(mesh, model, stage=2)
  q = state["params"]["layers"]["attn"]["q"]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)  # [L, D, N, K]
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    new, loss = step_jit(state, parallel.shard_batch(batch_np(), mesh))
  new = jax.tree.map(np.asarray, new)

  init, step = parts(model, stage=2)
  ref_state = nn.unbox(jax.jit(init)(jax.random.key(0)))
  ref, ref_loss = jax.jit(step)(ref_state, jax.tree.map(jnp.asarray, batch_np()))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-6),
               new["params"], jax.tree.map(np.asarray, ref["params"]))
  moved = np.abs(new["params"]["layers"]["mlp"]["up"]["kernel"] -
                 np.asarray(ref_state["params"]["layers"]["mlp"]["up"]["kernel"]))
  assert moved[0].max() > 0 and moved[1:].max() == 0  # stage 2: first layer only


def test_aot_compile_on_fake_mesh_keeps_output_shardings():
  model = make(scan=False)
  mesh = parallel.make_mesh(AXES)
  init, step = parts(model, stage=3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = parallel.logical_shardings(abstract, mesh)
  # Unbox outside the mesh context (there, unboxing applies the sharding constraints).
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(abstract), shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                     sharding=parallel.batch_sharding(mesh, v.ndim))
             for k, v in batch_np().items()}
    compiled = jax.jit(step, out_shardings=(shardings, None), donate_argnums=0).lower(
        abstract, batch).compile()
  out_state, _ = compiled.output_shardings
  params = out_state["params"]
  spec = lambda s: s.spec
  assert spec(params["text_embed"]) == P("tensor", "fsdp")  # [V, D]: vocab, embed
  assert spec(params["layers_0"]["attn"]["k"]) == P("fsdp", "tensor", None)
  assert spec(params["layers_0"]["attn"]["o"]) == P("tensor", None, "fsdp")
  assert spec(params["layers_0"]["mlp"]["down"]["kernel"]) == P("tensor", "fsdp")
  mu = out_state["opt"].inner_states["trainable"].inner_state[2][0].mu
  assert spec(mu["layers_0"]["mlp"]["gate"]["kernel"]) == P("fsdp", "tensor")
  assert compiled.memory_analysis() is not None
