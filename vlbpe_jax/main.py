"""Runs the pipeline's stages in order on one config; resumes from what `--workdir` holds.

  python -m vlbpe_jax.main --config=configs/tiny.py --workdir=runs/demo
  python -m vlbpe_jax.main --config=configs/tiny.py:tiny --workdir=/tmp/w \
      --config.stages=data,vq

With `VLBPE_DISTRIBUTED=1` (set by launch/tpu.sh and launch/gpu.sh's SLURM mode) every process
first joins the run (`parallel.initialize_distributed`).
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from vlbpe_jax import cli
from vlbpe_jax import parallel
from vlbpe_jax import train

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage's artifacts.",
                               required=True)
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ["XLA_FLAGS"] = parallel.side_by_side_xla_flags(flags.FLAGS.config,
                                                           os.environ.get("XLA_FLAGS", ""))
  parallel.initialize_distributed()  # before any other jax use
  jax.config.update("jax_threefry_partitionable", True)
  logging.info("JAX devices: %s", jax.devices())
  index = train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)
  print(f"Report: {index}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
