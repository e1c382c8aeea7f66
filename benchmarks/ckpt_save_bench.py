"""A first checkpoint save of a replicated state on 8 CPU devices: orbax's default writes
against `vlbpe_jax.checkpoint`'s (small arrays written by one replica).

  .venv/bin/python benchmarks/ckpt_save_bench.py --writer=ours      # vlbpe_jax.checkpoint
  .venv/bin/python benchmarks/ckpt_save_bench.py --writer=orbax     # orbax's default handler

Run each in a fresh process (jitted ops are cached per process, and the point is the first
save's compiles). The state is `--leaves` float32 arrays of shape (8 * k, 16) for k = 1..leaves
(every shape distinct, as a model's parameters mostly are; each has an axis that splits over 8
replicas), replicated on an 8-device mesh (`--xla_force_host_platform_device_count=8`, set
here), saved once synchronously. Prints one JSON line: seconds of the save, programs compiled
during it and their compile seconds (jax.monitoring).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from vlbpe_jax import checkpoint  # noqa: E402
from vlbpe_jax import parallel  # noqa: E402

_WRITER = flags.DEFINE_enum("writer", "ours", ["ours", "orbax"], "which handler saves")
_LEAVES = flags.DEFINE_integer("leaves", 40, "arrays in the state")

_COMPILES = []


def main(_):
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: _COMPILES.append(secs)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  mesh = parallel.make_mesh([("data", 8), ("fsdp", 1)])
  rng = np.random.default_rng(0)
  state = {f"w{k:03d}": rng.normal(size=(8 * k, 16)).astype(np.float32)
           for k in range(1, _LEAVES.value + 1)}
  state = jax.block_until_ready(jax.device_put(state, NamedSharding(mesh, P())))
  with tempfile.TemporaryDirectory() as d:
    del _COMPILES[:]
    t = time.perf_counter()
    if _WRITER.value == "ours":
      with checkpoint.Checkpointer(d, async_save=False) as ckpt:
        ckpt.save(1, state)
    else:
      with ocp.CheckpointManager(d, options=ocp.CheckpointManagerOptions(
          enable_async_checkpointing=False)) as mngr:
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    seconds = time.perf_counter() - t
  print(json.dumps(dict(writer=_WRITER.value, leaves=_LEAVES.value, devices=8,
                        save_s=round(seconds, 3), compiles=len(_COMPILES),
                        compile_s=round(sum(_COMPILES), 3))))


if __name__ == "__main__":
  app.run(main)
