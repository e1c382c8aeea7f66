"""Mesh building, logical rules, and sharded step == unsharded step on 8 fake devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlbpe_jax import parallel


class _Mlp(nn.Module):
  """Two logically partitioned Dense layers: enough to exercise fsdp and tensor rules."""

  @nn.compact
  def __call__(self, x):  # x: [B, D]
    init = nn.initializers.normal(0.1)
    h = nn.Dense(32, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
    h = nn.with_logical_constraint(nn.gelu(h), ("act_batch", "act_mlp"))  # [B, F]
    y = nn.Dense(8, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))(h)
    return nn.with_logical_constraint(y, ("act_batch", "act_embed"))  # [B, D]


def _run_step(mesh, batch):
  model, tx = _Mlp(), optax.adamw(1e-2)

  def init(key):
    params = model.init(key, jnp.zeros((2, 8)))["params"]
    return {"step": jnp.int32(0), "params": params, "opt": tx.init(params)}

  def step(state, batch):
    def loss_fn(params):
      return jnp.mean((model.apply({"params": params}, batch["x"]) - batch["y"]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt": opt}, loss

  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = parallel.logical_shardings(abstract, mesh)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    batch = parallel.shard_batch(batch, mesh)
    step_jit = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None),
                       donate_argnums=0)
    for _ in range(2):
      state, loss = step_jit(state, batch)
  state = nn.meta.unbox(state)
  return jax.tree.map(np.asarray, state), float(loss), shardings


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return {"x": rng.normal(size=(16, 8)).astype(np.float32),
          "y": rng.normal(size=(16, 8)).astype(np.float32)}


def test_make_mesh_fills_minus_one():
  mesh = parallel.make_mesh([("data", -1), ("fsdp", 2), ("tensor", 1)])
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("axes, match", [
    ([("data", 3)], "needs 3 devices"),
    ([("data", -1), ("fsdp", 3)], "not divisible"),
    ([("data", -1), ("fsdp", -1)], "at most one"),
    ([("data", 2), ("data", 4)], "repeat"),
])
def test_make_mesh_rejects_bad_axes(axes, match):
  with pytest.raises(ValueError, match=match):
    parallel.make_mesh(axes)


@pytest.mark.parametrize("axes", [[("data", 4), ("fsdp", 2), ("tensor", 1)],
                                  [("data", 4), ("fsdp", 1), ("tensor", 2)],
                                  [("data", 2), ("fsdp", 2), ("tensor", 2)]])
def test_sharded_step_equals_unsharded(batch, axes):
  ref, ref_loss, _ = _run_step(parallel.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)],
                                               jax.devices()[:1]), batch)
  got, got_loss, shardings = _run_step(parallel.make_mesh(axes), batch)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, ref)
  assert shardings["params"]["Dense_0"]["kernel"].spec == jax.sharding.PartitionSpec(
      "fsdp", "tensor")


def test_shard_batch_rejects_indivisible_batch():
  mesh = parallel.make_mesh([("data", -1)])
  with pytest.raises(ValueError, match="does not split"):
    parallel.shard_batch({"x": np.zeros((6, 2))}, mesh)


AXES3 = [("data", -1), ("fsdp", 1), ("tensor", 1)]


@pytest.mark.parametrize("batch, devices, want", [
    (4, 1, {"data": 1}),
    (4, 2, {"data": 2}),
    (4, 4, {"data": 4}),
    (4, 6, {"data": 2, "replica": 3}),
    (4, 8, {"data": 4, "replica": 2}),
    (6, 4, {"data": 2, "replica": 2}),
    (6, 6, {"data": 6}),
    (8, 6, {"data": 2, "replica": 3}),
    (16, 8, {"data": 8}),
    (3, 8, {"data": 1, "replica": 8}),
    ((8, 32), 8, {"data": 8}),  # several batches (the dit stage): each must split
    ((4, 8), 8, {"data": 4, "replica": 2}),
])
def test_plan_mesh_fits_the_batch_axis_to_the_batch(batch, devices, want):
  axes, why = parallel.plan_mesh(AXES3, devices, batch)
  assert dict(axes) == {"fsdp": 1, "tensor": 1, **want}
  assert [n for n, _ in axes][:3] == ["data", "fsdp", "tensor"]  # replica (if any) last
  assert f"over {devices} devices: {want['data']} batch shards" in why
  assert ("replicas" in why) == ("replica" in want)


@pytest.mark.parametrize("axes, batch, want", [
    ([("data", -1), ("fsdp", 2), ("tensor", 1)], 4,
     {"data": 2, "fsdp": 2, "tensor": 1, "replica": 2}),
    ([("data", 2), ("fsdp", -1), ("tensor", 1)], 12,
     {"data": 2, "fsdp": 2, "tensor": 1, "replica": 2}),
    ([("data", 2), ("fsdp", 1), ("tensor", -1)], 4, {"data": 2, "fsdp": 1, "tensor": 4}),
    ([("data", 4), ("fsdp", 2)], 8, {"data": 4, "fsdp": 2}),
    (AXES3, None, {"data": 8, "fsdp": 1, "tensor": 1}),  # no batch: every device
])
def test_plan_mesh_keeps_explicit_sizes(axes, batch, want):
  assert dict(parallel.plan_mesh(axes, 8, batch)[0]) == want


@pytest.mark.parametrize("axes, devices, batch, match", [
    ([("data", 8), ("fsdp", 1)], 8, 4, r"8 shards \(data=8 x fsdp=1\).*batch 4"),
    ([("data", -1), ("fsdp", 3)], 6, 4, r"3 shards \(fsdp=3\).*batch 4"),
    ([("data", 4), ("fsdp", 1)], 8, 4, "needs 4 devices; 8 are available"),
    ([("data", -1), ("tensor", 3)], 8, 4, "8 devices are not divisible"),
    ([("data", -1), ("replica", 2)], 8, 4, "'replica' is added"),
    (AXES3, 8, 0, "batch_size=0"),
])
def test_plan_mesh_rejects_bad_requests(axes, devices, batch, match):
  with pytest.raises(ValueError, match=match):
    parallel.plan_mesh(axes, devices, batch)


def test_mesh_from_config_fits_the_batch_and_logs_it(caplog):
  with caplog.at_level("INFO"):
    mesh = parallel.mesh_from_config(AXES3, jax.devices()[:6], batch_size=4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1, "replica": 3}
  assert "mesh data=2 fsdp=1 tensor=1 replica=3 (batch 4 over 6 devices: 2 batch shards, " \
         "3 replicas of each)" in caplog.text
  assert parallel.batch_shards(mesh) == 2
  x = parallel.shard_batch({"x": np.arange(8.0).reshape(4, 2)}, mesh)["x"]
  assert x.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  assert {s.data.shape for s in x.addressable_shards} == {(2, 2)}


@pytest.mark.parametrize("n", [1, 6, 8])
def test_sharded_step_on_a_fitted_mesh_equals_one_device(batch, n):
  # The global batch (16 rows) is fixed; only where its rows run changes with the devices.
  ref, ref_loss, _ = _run_step(parallel.make_mesh(AXES3, jax.devices()[:1]), batch)
  mesh = parallel.make_mesh(AXES3, jax.devices()[:n], batch_size=len(batch["x"]))
  got, got_loss, _ = _run_step(mesh, batch)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, ref)
