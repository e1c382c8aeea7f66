"""VQ-GAN benchmark: train the tiny config from scratch, report quality, time, encode speed.

  python benchmarks/vq_bench.py --config=configs/vq_tiny.py --workdir=/tmp/vq_bench
  python benchmarks/vq_bench.py --encode_only --variant=chameleon --resolution=512 \
      --codebook_size=8192 --code_dim=256        # encode throughput of a Chameleon-sized VQ

Training time is wall clock for the whole `train_and_evaluate` call (compilation, validation
and checkpoints included), plus the process CPU time, since the 2-core machine may be shared.
Encode throughput: jitted `VQModel.encode` on uint8 batches, compiled first, timed with
`jax.block_until_ready`. With --encode_only the weights are freshly initialised (speed only).
"""

import json
import shutil
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from vlbpe_jax.vq import model as model_lib
from vlbpe_jax.vq import train

config_flags.DEFINE_config_file("config", "configs/vq_tiny.py", "VQ config.")
flags.DEFINE_string("workdir", "/tmp/vq_bench", "Scratch run directory (wiped first).")
flags.DEFINE_bool("encode_only", False, "Only time encoding of a freshly initialised model.")
flags.DEFINE_string("variant", None, "Override vq.variant (encode_only).")
flags.DEFINE_integer("resolution", None, "Override data.resolution (encode_only).")
flags.DEFINE_integer("codebook_size", None, "Override vq.codebook_size (encode_only).")
flags.DEFINE_integer("code_dim", None, "Override vq.code_dim (encode_only).")
flags.DEFINE_integer("encode_batch", 64, "Images per encode call.")
flags.DEFINE_integer("encode_iters", 10, "Timed encode calls.")
flags.DEFINE_string("dtype", "float32", "Compute dtype for encode_only.")
FLAGS = flags.FLAGS


def encode_throughput(cfg, params, resolution, batch, iters) -> float:
  model = train.make_model(cfg)
  enc = jax.jit(lambda p, x: model.apply(
      {"params": p}, x.astype(jnp.float32) / 127.5 - 1.0, method=model_lib.VQModel.encode))
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, resolution, resolution, 3),
                                                    dtype=np.uint8))
  jax.block_until_ready(enc(params, x))  # compile
  t = time.perf_counter()
  for _ in range(iters):
    out = enc(params, x)
  jax.block_until_ready(out)
  return batch * iters / (time.perf_counter() - t)


def main(argv):
  del argv
  config = FLAGS.config
  out = {"device": str(jax.devices()[0].device_kind), "n_devices": jax.device_count()}
  if FLAGS.encode_only:
    with config.unlocked():
      for k in ("variant", "codebook_size", "code_dim", "dtype"):
        if FLAGS[k].value is not None:
          config.vq[k] = FLAGS[k].value
      if FLAGS.resolution:
        config.data.resolution = FLAGS.resolution
    cfg, res = config.vq, config.data.resolution
    model = train.make_model(cfg)
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    params = jax.jit(lambda k: nn.unbox(model.init(k, jnp.zeros((1, res, res, 3))))["params"])(
        jax.random.key(0))
  else:
    shutil.rmtree(FLAGS.workdir, ignore_errors=True)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    val = train.train_and_evaluate(config, FLAGS.workdir)
    out.update(train_wall_s=time.perf_counter() - t_wall,
               train_cpu_s=time.process_time() - t_cpu, steps=config.vq.total_steps,
               batch_size=config.vq.batch_size, **{f"val_{k}": v for k, v in val.items()})
    from vlbpe_jax.vq import tokenizer  # pylint: disable=g-import-not-at-top
    tok = tokenizer.Tokenizer.from_workdir(FLAGS.workdir)
    cfg, res, params = tok.config.vq, tok.resolution, tok.params
  out.update(variant=cfg.variant, resolution=res, codebook_size=cfg.codebook_size,
             encode_images_per_s=encode_throughput(cfg, params, res, FLAGS.encode_batch,
                                                   FLAGS.encode_iters))
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
