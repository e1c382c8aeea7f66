"""The demo's LM train step, one at a time and two side by side on threads of one process.

The pipeline runs two pieces of work at once on threads (`config.stage_workers`: e.g. the
text_icl stage, V2L's frozen LM, beside the lm stage's Being-VL runs). This times that case in isolation: the demo's step
(`Ti`, batch 8, 384 tokens, bf16, blockwise attention; `lm_bench.train_step`, a full stage-3
step), N steps on one thread, then N steps on each of two threads at once, with the
process's CPU seconds. Run it with and without a flag in XLA_FLAGS, alternating, to compare:

  for i in 1 2 3; do for f in "" --xla_cpu_multi_thread_eigen=false; do
    XLA_FLAGS="$f" .venv/bin/python benchmarks/lm_side_by_side.py --steps 40; done; done

Prints one JSON line per run (the losses show that both lanes computed the same thing).
"""

import argparse
import json
import os
import platform
import resource
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lm_bench  # beside this file: the same step
from vlbpe_jax.lm import model as lm_model
from vlbpe_jax.lm import stages


def make_step(args):
  num_vq = (args.visual_vocab - 8) // 2
  cfg = lm_model.lm_config(args.variant, text_vocab=args.vocab, num_special=8, num_vq=num_vq,
                           num_bpe=args.visual_vocab - 8 - num_vq, dtype=args.dtype,
                           attention_impl=args.attention)
  model = lm_model.LM(cfg)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size,
                                                      (args.batch, args.seq + 1)), jnp.int32)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), ids[:, :-1]))["params"])()
  tx = stages.make_optimizer(3, params, 1e-4, clip=1.0, weight_decay=0.1)
  state = {"params": params, "opt": tx.init(params)}
  return jax.jit(lm_bench.train_step(model, tx)).lower(state, ids).compile(), state, ids


def lanes(compiled, state, ids, num_lanes, steps):
  """`steps` steps on each of `num_lanes` threads at once: wall, steps/s, CPU seconds."""
  losses = [None] * num_lanes

  def lane(i):
    s = state
    for _ in range(steps):
      s, loss = compiled(s, ids)
    losses[i] = float(loss)

  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  threads = [threading.Thread(target=lane, args=(i,)) for i in range(num_lanes)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
  cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
  if len(set(losses)) != 1:
    raise RuntimeError(f"the lanes computed different losses: {losses}")
  return dict(wall_s=round(wall, 2), steps_per_s=round(num_lanes * steps / wall, 2),
              cpu_s=round(cpu, 1), loss=losses[0])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="Ti")
  ap.add_argument("--vocab", type=int, default=408, help="text rows (the demo's, padded)")
  ap.add_argument("--visual_vocab", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=384)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--attention", default="blockwise")
  ap.add_argument("--steps", type=int, default=40, help="steps per lane")
  args = ap.parse_args()
  if args.steps < 1:
    ap.error(f"--steps={args.steps}: expected >= 1")
  compiled, state, ids = make_step(args)
  lanes(compiled, state, ids, 1, 2)  # warm-up
  print(json.dumps(dict(
      xla_flags=os.environ.get("XLA_FLAGS", ""), cpus=os.cpu_count(),
      machine=platform.processor() or platform.machine(), **vars(args),
      one=lanes(compiled, state, ids, 1, args.steps),
      two=lanes(compiled, state, ids, 2, args.steps))))


if __name__ == "__main__":
  main()
