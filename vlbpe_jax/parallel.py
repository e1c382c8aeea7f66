"""Device mesh, logical-axis rules and sharding helpers shared by every stage.

Model code names axes logically (`embed`, `mlp`, `act_batch`, ...); one table maps them to
the mesh axes `data`, `fsdp`, `tensor`. Weights and activations use distinct names so that
they can be sharded differently (weights over `fsdp`, activations over `data`+`fsdp`).

The mesh rule (`plan_mesh`, the only place it lives): a config fixes the global batch; with
the batch axis sized -1 the mesh's batch axes get the largest divisor of that batch that
divides the device count, and the devices left over replicate (a `replica` axis), e.g. batch 4
on 8 devices: data=4, replica=2; on 6: data=2, replica=3. Every trainer builds its mesh with
`mesh_from_config(config.mesh, batch_size=...)` and shards batches with `shard_batch`.

  mesh = make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)], batch_size=8)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    state_sharding = logical_shardings(abstract_state, mesh)
    state = jax.jit(init, out_shardings=state_sharding)(key)
"""

from collections.abc import Sequence
import os

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlbpe_jax import config_utils

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # a batch's rows split over these (the `act_batch` rule)
REPLICA_AXIS = "replica"  # devices the batch cannot use; no rule names it (see `plan_mesh`)

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES = (
    # Activations.
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
    ("act_height", None),
    ("act_width", None),
    ("act_channels", None),
    # Weights.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("conv_h", None),
    ("conv_w", None),
    ("codebook", None),
    ("code_dim", None),
)


def _env_int(name: str):
  value = os.environ.get(name, "")
  if not value:
    return None
  if not value.isdigit():
    raise ValueError(f"{name}={value!r}: expected a non-negative integer")
  return int(value)


def initialize_distributed() -> bool:
  """Joins a multi-process run when `VLBPE_DISTRIBUTED=1`; call it before any other jax use.

  The launchers set it (launch/tpu.sh on every TPU worker, launch/gpu.sh under SLURM). Then
  `jax.distributed.initialize` gets `num_processes` / `process_id` from `VLBPE_NUM_PROCESSES` /
  `VLBPE_PROCESS_ID` and reads `JAX_COORDINATOR_ADDRESS` / `JAX_LOCAL_DEVICE_IDS` itself; what
  is unset it detects (a Cloud TPU slice from its metadata server, SLURM, Open MPI). Unset or
  `0`: one process, nothing to do. Returns whether it initialized.
  """
  if not config_utils.distributed_requested():
    return False
  if jax.distributed.is_initialized():  # a CLI's main() called from a started process
    return False
  # CPU processes (tests, a CPU cluster) all-reduce over gloo; accelerators ignore the flag.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(num_processes=_env_int("VLBPE_NUM_PROCESSES"),
                             process_id=_env_int("VLBPE_PROCESS_ID"))
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def _workers_asked(config) -> int:
  n = config.get("stage_workers", 1)
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"config.stage_workers={n!r}: expected an integer >= 1 (pieces of work "
                     "run at once)")
  return n


# XLA:CPU splits each matmul and convolution over every core (Eigen's thread pool). Two pieces
# of work side by side (`stage_workers` > 1) then split each op of both over the same cores,
# and their threads wait on one another. With these ops on one thread each (the fusions XLA
# emits still use the pool), two demo LM steps side by side ran 5% faster on the 2-core Zen 3
# host (interleaved runs; one alone: the same); a fresh-clone demo with it took 962 s against
# 1033 s there (host drift included), its 217 metrics equal to the last digit (BENCHMARKS.md,
# "One thread per Eigen op"). Only the CPU backend reads it.
SIDE_BY_SIDE_XLA_FLAG = "--xla_cpu_multi_thread_eigen=false"


def side_by_side_xla_flags(config, flags: str) -> str:
  """XLA_FLAGS for a pipeline process: `flags` with `SIDE_BY_SIDE_XLA_FLAG` added when the
  config runs work side by side (`config.stage_workers` > 1; not in a multi-process run, which
  runs one stage at a time) and `flags` does not set that flag itself. Set it before the first
  jax computation (the backend reads it at start)."""
  name = SIDE_BY_SIDE_XLA_FLAG.split("=")[0]
  if (_workers_asked(config) == 1 or config_utils.distributed_requested()
      or any(f.split("=")[0] == name for f in flags.split())):
    return flags
  return f"{flags} {SIDE_BY_SIDE_XLA_FLAG}".strip()


def stage_workers(config) -> int:
  """How many pieces of work of the pipeline may run at once on threads of this process
  (stages, `train.run_stages`; the v2l stage's restoration beside its few-shot tasks):
  `config.stage_workers` (default 1); 1 in a multi-process run and on several accelerators,
  whose collectives must meet in one order."""
  n = _workers_asked(config)
  if n > 1 and jax.process_count() > 1:
    logging.info("stage_workers=%d: %d processes run one stage at a time", n,
                 jax.process_count())
    return 1
  if n > 1 and jax.device_count() > 1 and jax.default_backend() != "cpu":
    # Two programs with collectives, dispatched from two threads, could reach the devices in
    # different orders and wait on each other; the CPU's in-process collectives meet per run.
    logging.info("stage_workers=%d: one stage at a time on %d %s devices", n,
                 jax.device_count(), jax.default_backend())
    return 1
  return n


def is_primary() -> bool:
  """Whether this process writes the run's non-array files (JSON, npz, metrics, reports):
  process 0; orbax writes the arrays of a checkpoint from every process itself."""
  return jax.process_index() == 0


BARRIER_TIMEOUT_S = 1800  # how long a process waits at `barrier` for the slowest one
_barriers = [0]  # barriers passed by this process: every process passes them in one order


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S):
  """Waits until every process got here (a no-op in a one-process run), through jax's
  coordination service: no device collective, so no 30-second rendezvous (see `Together`).
  `name` tags the barrier: processes that reach different names time out naming theirs."""
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
  _barriers[0] += 1
  multihost.get_jax_distributed_client().wait_at_barrier(
      f"vlbpe/{_barriers[0]}/{name}", int(timeout_s * 1000))


def sync(name: str):
  """Waits until every process got here (a no-op in a one-process run); `name` tags the
  barrier, e.g. `"vq/codes written"`, so that a mismatch names both sides."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    barrier(name)  # first wait as long as it takes, then check the names in step
    multihost_utils.sync_global_devices(name)


class Together:
  """A jitted function whose first call, in a multi-process run, compiles and then waits for
  every process before it runs; later calls (and `lower`, ...) go straight to `jitted`.

  Why: on CPU hosts (gloo), the first collective over a group of devices makes each process
  publish its address and wait at most 30 s (fixed in XLA) for the others'. Processes compile a
  large step in different times (sharing cores, one host slower), and one that started running
  more than 30 s before another fails with "Gloo context initialization failed:
  DEADLINE_EXCEEDED". Call it with the arguments of every call (global arrays): every process
  must make the first call, as for any function over global arrays.
  """

  def __init__(self, jitted, name: str):
    self.jitted, self.name, self._first = jitted, name, True

  def __call__(self, *args, **kwargs):
    if self._first and jax.process_count() > 1:
      self.jitted.lower(*args, **kwargs).compile()  # jax keeps it: the call below reuses it
      barrier(f"compiled {self.name}")
    self._first = False
    return self.jitted(*args, **kwargs)

  def __getattr__(self, attr):
    return getattr(self.jitted, attr)


def plan_mesh(axes: Sequence[tuple[str, int]], num_devices: int,
              batch_size: int | Sequence[int] | None = None) -> tuple[list[tuple[str, int]], str]:
  """The mesh rule: `(axes with every size fixed, why)` for `num_devices` devices.

  One size of `axes` may be -1 (= the remaining devices). When it is on a batch axis (`data`,
  `fsdp`) and `batch_size` (the global rows per step; several: each must split) is given, the
  batch axes take the largest share of the remaining devices that divides the batch, and the
  devices left over form a trailing `replica` axis that no logical rule names: every array is
  replicated over it (those devices compute the same shards). So a config's global batch never
  depends on the device count, and neither do its results (beyond float reduction order).
  Sizes given explicitly are kept; a batch they do not split is a ValueError.
  """
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh axes {tuple(names)} repeat a name")
  if REPLICA_AXIS in names:
    raise ValueError(f"mesh axes {tuple(names)}: {REPLICA_AXIS!r} is added by the mesh rule")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes {sizes}: at most one may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes {sizes}: expected positive sizes or one -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  batches = () if batch_size is None else tuple(
      int(b) for b in np.atleast_1d(np.asarray(batch_size)))
  if any(b < 1 for b in batches):
    raise ValueError(f"batch_size={batch_size!r}: expected positive global batch sizes")
  rows = int(np.gcd.reduce(batches)) if batches else None  # a size every batch is a multiple of
  what = "batch " + "/".join(str(b) for b in batches)
  if -1 not in sizes:
    if known != num_devices:
      raise ValueError(f"mesh {list(axes)} needs {known} devices; {num_devices} are available "
                       "(give one axis size -1 to use every device)")
  elif num_devices % known:
    raise ValueError(f"mesh {list(axes)}: {num_devices} devices are not divisible by the fixed "
                     f"axes' product {known}")
  free = num_devices // known
  fixed = [(n, s) for n, s in zip(names, sizes) if n in BATCH_AXES and s != -1]
  fixed_batch = int(np.prod([s for _, s in fixed]))
  if rows is not None and rows % fixed_batch:
    raise ValueError(f"mesh {list(axes)} splits each batch over {fixed_batch} shards ("
                     + " x ".join(f"{n}={s}" for n, s in fixed) + f"), which does not divide "
                     f"the global {what}; give the batch axis size -1 to fit the mesh to it")
  replicas = 1
  if -1 in sizes:
    i = sizes.index(-1)
    if names[i] in BATCH_AXES and rows is not None:
      sizes[i] = int(np.gcd(free, rows // fixed_batch))  # the largest divisor of both
      replicas = free // sizes[i]
    else:
      sizes[i] = free
  shards = int(np.prod([s for n, s in zip(names, sizes) if n in BATCH_AXES]))
  if rows is None:
    why = f"{num_devices} devices, no batch size given"
  else:
    why = f"{what} over {num_devices} devices: {shards} batch shards"
    why += f", {replicas} replicas of each" if replicas > 1 else ""
  out = list(zip(names, sizes))
  if replicas > 1:
    out.append((REPLICA_AXIS, replicas))
  return out, why


def make_mesh(axes: Sequence[tuple[str, int]], devices=None, *,
              batch_size: int | Sequence[int] | None = None) -> Mesh:
  """Builds the mesh `plan_mesh(axes, len(devices), batch_size)` chooses and logs it.

  `axes`: `[(name, size), ...]`, one size may be -1. Axes are `AxisType.Auto` so that Linen's
  logical partitioning works (see NOTES.md).
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  axes, why = plan_mesh(axes, devices.size, batch_size)
  logging.info("mesh %s (%s)", " ".join(f"{n}={s}" for n, s in axes), why)
  names, sizes = tuple(n for n, _ in axes), [s for _, s in axes]
  return Mesh(devices.reshape(sizes), names,
              axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def use_mesh(mesh):
  """`jax.set_mesh(mesh)`; for a `jax.sharding.AbstractMesh` (lowering for a target without its
  devices, vlbpe_jax/aot.py) `jax.sharding.use_abstract_mesh(mesh)`."""
  if isinstance(mesh, jax.sharding.AbstractMesh):
    return jax.sharding.use_abstract_mesh(mesh)
  return jax.set_mesh(mesh)


def mesh_from_config(mesh_cfg, devices=None, *, batch_size=None) -> Mesh:
  """`config.mesh` is a list of `(name, size)` pairs, e.g. `[("data", -1), ("fsdp", 1)]`;
  `batch_size`: the global batch(es) that the mesh's trainers shard (see `plan_mesh`)."""
  return make_mesh([tuple(a) for a in mesh_cfg], devices, batch_size=batch_size)


def logical_shardings(abstract_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for a tree of (possibly `nn.Partitioned`-boxed) abstract arrays.

  Leaves without logical names are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int, batch_axes=BATCH_AXES) -> NamedSharding:
  """Sharding of a batch array `[B, ...]`: B over the batch mesh axes present in `mesh`."""
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def shard_batch(batch, mesh: Mesh, batch_axes=BATCH_AXES):
  """Turns a host-local numpy batch (a pytree of `[B_local, ...]`) into global jax Arrays.

  Every process passes its own rows; the global batch is their concatenation.
  """
  n_batch = int(np.prod([mesh.shape[a] for a in batch_axes if a in mesh.axis_names]))

  def put(x):
    x = np.asarray(x)
    global_rows = x.shape[0] * jax.process_count()
    if global_rows % n_batch:
      raise ValueError(f"batch of {global_rows} rows (shape {x.shape}) does not split over "
                       f"{n_batch} batch shards of mesh {dict(mesh.shape)}; build the mesh "
                       "with mesh_from_config(..., batch_size=) to fit it to the batch")
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh, x.ndim, batch_axes), x)

  # An explicit transfer; with several processes jax makes it through `make_array_from_callback`,
  # which the loop's transfer guard would refuse.
  with jax.transfer_guard_host_to_device("allow"):
    return jax.tree.map(put, batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _replicate_leaf(x, sharding):
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(_replicate_leaf(jax.random.key_data(x), sharding),
                                    impl=jax.random.key_impl(x))
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.jit(lambda y: y, out_shardings=sharding)(x)  # already global
  return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def replicate(tree, mesh: Mesh):
  """Host values (numpy arrays, scalars, jax arrays or PRNG keys on one device) as global
  arrays replicated over `mesh`; every process passes the same values. (`jax.device_put`
  cannot place onto another process's devices.)"""
  with jax.transfer_guard_host_to_device("allow"):
    return jax.tree.map(lambda x: _replicate_leaf(x, replicated(mesh)), tree)


def shard_global_batch(batch, mesh: Mesh, batch_axes=("data", "fsdp")):
  """Like `shard_batch`, for a host batch (pytree of `[B, ...]`) that every process holds
  whole (evaluation, encoding a split): each process places the rows of its own devices."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim, batch_axes),
                                        lambda index: x[index])

  with jax.transfer_guard_host_to_device("allow"):
    return jax.tree.map(put, batch)


def fetch(tree):
  """Global arrays -> host numpy, whole on every process (gathered across processes when
  other processes hold some of the rows)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def _key_names(path):
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def opt_shardings(abstract_opt, abstract_params, param_shardings, mesh: Mesh):
  """Shardings of an optimizer state: a leaf whose path ends with a parameter's path and has
  its shape (Adam moments) gets that parameter's sharding; the rest is replicated."""
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
  by_path = {_key_names(p): (x.shape, s) for (p, x), s in zip(
      jax.tree_util.tree_flatten_with_path(abstract_params)[0],
      jax.tree.leaves(param_shardings, is_leaf=is_sharding))}

  def pick(path, x):
    names = _key_names(path)
    for i in range(len(names)):
      hit = by_path.get(names[i:])
      if hit is not None and hit[0] == x.shape:
        return hit[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def map_batches(fn, x: np.ndarray, batch_size: int, multiple: int):
  """Applies `fn` to batches of host array `x` and concatenates its (pytree of) outputs.

  Batches are `batch_size` rounded up to a multiple of `multiple` (the batch shards); the last
  one is zero-padded and the padding rows are dropped from the outputs. `x` must be non-empty.
  """
  bs = -(-batch_size // multiple) * multiple
  outs = []
  for i in range(0, len(x), bs):
    chunk = x[i:i + bs]
    pad = bs - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    outs.append(jax.tree.map(lambda o, n=bs - pad: np.asarray(o)[:n], fn(chunk)))
  return jax.tree.map(lambda *o: np.concatenate(o), *outs)


def batch_shards(mesh: Mesh, batch_axes=BATCH_AXES) -> int:
  """How many ways a batch is split (the product of the batch mesh axes)."""
  return int(np.prod([mesh.shape[a] for a in batch_axes if a in mesh.axis_names]))
