"""Checkpointer: restore onto other meshes, iterator state, keep-last-k, refusals."""

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlbpe_jax import checkpoint, parallel
from vlbpe_jax.data import pipeline


def _state(mesh):
  w = jnp.arange(8 * 8, dtype=jnp.float32).reshape(8, 8)
  return {"step": jnp.int32(7),
          "params": {"w": jax.device_put(w, NamedSharding(mesh, P("data", "fsdp"))),
                     "b": jax.device_put(jnp.ones((8,), jnp.bfloat16), NamedSharding(mesh, P()))},
          "opt": {"mu": jax.device_put(w * 0.5, NamedSharding(mesh, P("fsdp", None)))}}


def _shardings(mesh):
  return {"step": NamedSharding(mesh, P()),
          "params": {"w": NamedSharding(mesh, P("data", "fsdp")),
                     "b": NamedSharding(mesh, P())},
          "opt": {"mu": NamedSharding(mesh, P("fsdp", None))}}


@pytest.mark.parametrize("target", [(2, 4), (1, 1)])
def test_restore_on_another_mesh(tmp_path, target):
  src = parallel.make_mesh([("data", 4), ("fsdp", 2)])
  state = _state(src)
  with checkpoint.Checkpointer(tmp_path, config={"model": {"width": 8}}) as ckpt:
    ckpt.save(7, state)
  n = target[0] * target[1]
  dst = parallel.make_mesh([("data", target[0]), ("fsdp", target[1])], jax.devices()[:n])
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 7
    got = ckpt.restore(checkpoint.abstract_like(state, _shardings(dst)))
  assert got["params"]["w"].sharding.mesh.shape == dst.shape
  assert got["params"]["b"].dtype == jnp.bfloat16
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               got, state)


_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: _COMPILES.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)


def test_small_replicated_arrays_are_saved_without_compiling(tmp_path):
  # Orbax cuts a replicated array into one slice per replica, each with a jitted op compiled
  # per device and shape: 8 devices x 3 odd shapes here gave 24 compiles before the registry
  # of checkpoint._StateHandler. Large slices stay replica-parallel.
  mesh = parallel.make_mesh([("data", 8), ("fsdp", 1)])
  rep = NamedSharding(mesh, P())
  rng = np.random.default_rng(0)
  # Shapes no other test uses (compiled programs are cached per process), each with an axis
  # that splits over the 8 replicas (orbax cuts along such an axis).
  state = {"a": rng.normal(size=(3, 5, 8)), "b": rng.normal(size=(16, 13)).astype(np.float32),
           "c": rng.integers(0, 9, size=(24,)).astype(np.int32)}
  state = jax.device_put(state, rep)
  big = checkpoint.REPLICA_PARALLEL_MIN_SLICE_BYTES * len(jax.devices()) // 4  # float32
  state["big"] = jax.device_put(jnp.arange(big, dtype=jnp.float32).reshape(8, -1), rep)
  jax.block_until_ready(state)
  _COMPILES.clear()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {k: v for k, v in state.items() if k != "big"})
    ckpt.wait()
    assert not _COMPILES, f"{len(_COMPILES)} programs compiled while saving small arrays"
    ckpt.save(2, state)  # the large array: one slice per replica, as orbax's default
    ckpt.wait()
    assert len(_COMPILES) >= 2, "the large replicated array was not written in slices"
    got = ckpt.restore(checkpoint.abstract_like(state, jax.tree.map(lambda _: rep, state)))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               got, state)


def test_refuses_mismatched_tree_and_config(tmp_path):
  mesh = parallel.make_mesh([("data", 4), ("fsdp", 2)])
  state = _state(mesh)
  with checkpoint.Checkpointer(tmp_path, config={"model": {"width": 8}},
                               must_match=("model.width",)) as ckpt:
    ckpt.save(1, state)
  wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  wrong["params"]["w"] = jax.ShapeDtypeStruct((4, 8), jnp.float32)
  wrong["params"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
  with checkpoint.Checkpointer(tmp_path, config={"model": {"width": 8}}) as ckpt:
    with pytest.raises(ValueError, match=r"(?s)\['extra'\]: missing.*shape \(8, 8\)"):
      ckpt.restore(wrong)
  with checkpoint.Checkpointer(tmp_path, config={"model": {"width": 16}},
                               must_match=("model.width",)) as ckpt:
    with pytest.raises(ValueError, match="model.width: checkpoint has 8, config has 16"):
      ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  # The data layout is not matched: the data iterator's per-shard files check it.
  with checkpoint.Checkpointer(tmp_path, config={"model": {"width": 8, "data_shards": 4}},
                               must_match=("model",)) as ckpt:
    ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  # A field at its neutral default (manifest.NEUTRAL_DEFAULTS) matches a checkpoint written
  # before it existed; any other value does not.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with checkpoint.Checkpointer(tmp_path, config={"model": {"width": 8, "hard_negatives": ()}},
                               must_match=("model",)) as ckpt:
    ckpt.restore(abstract)
  with checkpoint.Checkpointer(tmp_path, config={"model": {"width": 8,
                                                           "hard_negatives": ("shape",)}},
                               must_match=("model",)) as ckpt:
    with pytest.raises(ValueError, match="model: checkpoint has"):
      ckpt.restore(abstract)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="no such checkpoint"):
      ckpt.restore(wrong, step=99)


def test_keeps_last_k(tmp_path):
  state = {"step": jnp.int32(0), "x": jnp.zeros((3,))}
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in range(4):
      ckpt.save(step, state)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]


def _iterator():
  ds = grain.MapDataset.range(10).shuffle(seed=3).repeat(3).batch(4)
  return iter(ds.to_iter_dataset())


def test_iterator_state_resumes_exact_batches(tmp_path):
  it = _iterator()
  for _ in range(3):
    next(it)
  state = {"step": jnp.int32(3)}
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, state, data_iter=it)
  expected = [next(it).tolist() for _ in range(4)]  # crosses an epoch boundary
  fresh = _iterator()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
                 data_iter=fresh)
  assert [next(fresh).tolist() for _ in range(4)] == expected


def test_sharded_iterator_restores_per_shard_and_from_a_per_process_file(tmp_path):
  make = functools.partial(pipeline.dataset, list(range(12)), seed=0)
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32)}
  for name, it in (("sharded", pipeline.sharded_iterator(make, batch_size=4, data_shards=2)),
                   # grain's own file (process_0-of-1.json): the trainers' iterators before
                   # their data was sharded; one shard of one process reads the same rows.
                   ("legacy", iter(pipeline.dataset(list(range(12)), batch_size=4, seed=0)))):
    for _ in range(2):
      next(it)
    with checkpoint.Checkpointer(tmp_path / name) as ckpt:
      ckpt.save(2, {"step": jnp.int32(2)}, data_iter=it)
    expected = [next(it).tolist() for _ in range(3)]  # crosses an epoch boundary
    fresh = pipeline.sharded_iterator(make, batch_size=4,
                                      data_shards=2 if name == "sharded" else 0)
    with checkpoint.Checkpointer(tmp_path / name) as ckpt:
      ckpt.restore(abstract, data_iter=fresh)
    assert [next(fresh).tolist() for _ in range(3)] == expected, name
  with checkpoint.Checkpointer(tmp_path / "sharded") as ckpt:
    with pytest.raises(ValueError, match=r"lacks \['shard_0-of-4'"):
      ckpt.restore(abstract, data_iter=pipeline.sharded_iterator(make, batch_size=4,
                                                                 data_shards=4))


def test_empty_directory_raises(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(ValueError, match="no checkpoint"):
      ckpt.restore({"x": jax.ShapeDtypeStruct((1,), jnp.float32)})


def test_restore_latest_reads_the_last_step_and_names_what_is_missing(tmp_path):
  mesh = parallel.make_mesh([("data", 4), ("fsdp", 2)])
  abstract = checkpoint.abstract_like(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(mesh)),
      _shardings(mesh))
  with pytest.raises(ValueError, match=r"no CLIP checkpoint in .*empty: run the 'clip' stage"):
    checkpoint.restore_latest(str(tmp_path / "empty"), abstract, what="CLIP",
                              hint="run the 'clip' stage first")
  with checkpoint.Checkpointer(tmp_path / "run", config={"model": {"width": 8}}) as ckpt:
    ckpt.save(1, _state(mesh))
    later = _state(mesh)
    later["step"] = jnp.int32(9)
    ckpt.save(2, later)
  got = checkpoint.restore_latest(str(tmp_path / "run"), abstract, what="CLIP", hint="-",
                                  config={"model": {"width": 8}}, must_match=("model.width",))
  assert int(got["step"]) == 9
  np.testing.assert_array_equal(got["params"]["w"], later["params"]["w"])
  with pytest.raises(ValueError, match="model.width"):
    checkpoint.restore_latest(str(tmp_path / "run"), abstract, what="CLIP", hint="-",
                              config={"model": {"width": 16}}, must_match=("model.width",))
