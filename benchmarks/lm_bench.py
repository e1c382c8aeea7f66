"""Unified LM train-step throughput as a fraction of this machine's measured matmul FLOP/s.

  .venv/bin/python benchmarks/lm_bench.py --variant mu --batch 8 --seq 256
  .venv/bin/python benchmarks/lm_bench.py --variant Ti --batch 8 --seq 384 --vocab 360 \
      --visual_vocab 1024 --dtype bfloat16 --attention blockwise   # the demo's LM step
  .venv/bin/python benchmarks/lm_bench.py --width 384 --depth 4 --heads 6 --kv_heads 6 \
      --mlp 1536 --batch 8 --seq 256 --dtype bfloat16 --param_dtype bfloat16

FLOPs are counted like MaxText: 6 * tokens * (matmul params incl. the output head) + causal
attention 6 * L * B * T^2 * N * K (half of the full T x T). The step is a full stage-3 step
(forward, backward, clip, AdamW via `stages.make_optimizer`), jitted with the state donated.
The reference peak is a jitted 2048^3 matmul in the compute dtype (and in float32), timed
between the steps. Prints one JSON line.

  .venv/bin/python benchmarks/lm_bench.py --variant S --generate 64 --batch 8 --seq 32

times KV-cache generation instead: `--generate` new tokens after a `--seq` token prompt
(greedy, no stop tokens), reported as generated tokens/s over the whole call (prefill included)
after a compile run.

On an accelerator, MFU is against the chip's nominal dense peak, as MaxText reports it
(H100 SXM bf16: 989 TFLOP/s):

  .venv/bin/python benchmarks/lm_bench.py --variant 1B --batch 8 --seq 2048 --dtype bfloat16 \
      --attention cudnn --scan --remat dots_no_batch --peak_tflops 989

`--compile_only` lowers and compiles that step on whatever backend is here without running it
(the state is abstract: nothing of the model's size is allocated) and prints XLA's memory
analysis and FLOP count beside ours: a check, on a CPU, that a GPU/TPU command builds.
"""

import argparse
import json
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlbpe_jax.lm import generate as lm_generate
from vlbpe_jax.lm import model as lm_model
from vlbpe_jax.lm import stages
from vlbpe_jax.lm.config import VARIANTS


def matmul_fn(dtype, n=2048):
  """A jitted n^3 matmul and its FLOPs: the machine's reference peak."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  return lambda: f(a, b).block_until_ready(), 2 * n**3


def _time(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def describe(cfg, args):
  """The fields every result line carries: where it ran and what was measured."""
  return dict(
      device=str(jax.devices()[0].device_kind), machine=platform.processor() or platform.machine(),
      variant=args.variant, width=cfg.width, depth=cfg.depth, heads=cfg.num_heads,
      kv_heads=cfg.num_kv_heads, mlp=cfg.mlp_dim, vocab=cfg.vocab_size, batch=args.batch,
      seq=args.seq, dtype=args.dtype, param_dtype=args.param_dtype, scan=args.scan,
      remat=args.remat, attention=args.attention)


def step_flops(cfg, batch, seq):
  d, n, nkv, k, f, L = (cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                        cfg.depth)
  per_layer = 2 * d * n * k + 2 * d * nkv * k + 3 * d * f
  dense = 6 * batch * seq * (L * per_layer + cfg.vocab_size * d)
  attention = 6 * L * batch * seq**2 * n * k
  return dense + attention, L * per_layer + cfg.vocab_size * d


def train_step(model, tx):
  """The benchmarked step: `(state, ids) -> (state, loss)`, next-token cross-entropy on
  `ids[:, :-1]` -> `ids[:, 1:]`, then `tx` (not jitted)."""

  def step(state, ids):
    def loss_fn(params):
      logits = model.apply({"params": params}, ids[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

  return step


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="mu")
  ap.add_argument("--width", type=int)
  ap.add_argument("--depth", type=int)
  ap.add_argument("--heads", type=int)
  ap.add_argument("--kv_heads", type=int)
  ap.add_argument("--mlp", type=int)
  ap.add_argument("--vocab", type=int, help="text rows (default: the variant's, else 512)")
  ap.add_argument("--visual_vocab", type=int, default=512,
                  help="new rows: 8 special, then VQ codes and BPE tokens half and half")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--dtype", default="float32", help="compute dtype")
  ap.add_argument("--param_dtype", default="float32")
  ap.add_argument("--scan", action="store_true")
  ap.add_argument("--remat", default="none")
  ap.add_argument("--attention", default=None, help="LMConfig.attention_impl (e.g. blockwise)")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--generate", type=int, default=0, help="time generation of this many tokens")
  ap.add_argument("--peak_tflops", type=float,
                  help="the accelerator's nominal peak in the compute dtype: adds `mfu`")
  ap.add_argument("--compile_only", action="store_true",
                  help="compile the train step with an abstract state and report its memory")
  ap.add_argument("--note", default="", help="free text recorded with the result")
  args = ap.parse_args()
  if args.compile_only and args.generate:
    ap.error("--compile_only compiles the train step; it cannot be combined with --generate")
  if args.vocab is None:
    args.vocab = VARIANTS.get(args.variant, {}).get("text_vocab", 512)
  sizes = {k: v for k, v in dict(width=args.width, depth=args.depth, num_heads=args.heads,
                                 num_kv_heads=args.kv_heads, mlp_dim=args.mlp).items()
           if v is not None}
  num_vq = (args.visual_vocab - 8) // 2
  cfg = lm_model.lm_config(args.variant, text_vocab=args.vocab, num_special=8, num_vq=num_vq,
                           num_bpe=args.visual_vocab - 8 - num_vq, dtype=args.dtype,
                           param_dtype=args.param_dtype,
                           scan_layers=args.scan, remat_policy=args.remat,
                           attention_impl=args.attention, **sizes)
  model = lm_model.LM(cfg)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)), jnp.int32)
  init = lambda: nn.unbox(model.init(jax.random.key(0), ids[:, :-1]))["params"]
  if args.compile_only:
    params = jax.eval_shape(init)
  else:
    params = jax.jit(init)()
  if args.generate:
    return bench_generate(model, params, np.asarray(ids[:, :-1]), args)
  tx = stages.make_optimizer(3, params, 1e-4, clip=1.0, weight_decay=0.1)
  state = {"params": params, "opt": jax.eval_shape(tx.init, params) if args.compile_only
           else tx.init(params)}

  step = jax.jit(train_step(model, tx), donate_argnums=0)
  t = time.perf_counter()
  compiled = step.lower(state, ids).compile()
  compile_s = time.perf_counter() - t
  if args.compile_only:
    return report_compiled(compiled, cfg, args, compile_s)
  state, loss = compiled(state, ids)
  loss.block_until_ready()
  # The machine may be shared: interleave the reference matmul with the steps, and report the
  # best step against the best matmul (a quiet moment) as well as median against median.
  peak_fns = {"float32": matmul_fn(jnp.float32)}
  if args.dtype != "float32":
    peak_fns[args.dtype] = matmul_fn(jnp.dtype(args.dtype))
  times, peak_times = [], {k: [] for k in peak_fns}
  for _ in range(args.steps):
    for k, (fn, _) in peak_fns.items():
      peak_times[k].append(_time(fn))
    t = time.perf_counter()
    state, loss = compiled(state, ids)
    loss.block_until_ready()
    times.append(time.perf_counter() - t)
  flops, matmul_params = step_flops(cfg, args.batch, args.seq)
  peak = {k: (peak_fns[k][1] / min(v), peak_fns[k][1] / float(np.median(v)))
          for k, v in peak_times.items()}
  best, median = min(times), float(np.median(times))
  ref = peak[args.dtype]
  out = dict(
      **describe(cfg, args), matmul_params=matmul_params, gflop_per_step=round(flops / 1e9, 3),
      compile_s=round(compile_s, 2), step_s_median=round(median, 4), step_s_best=round(best, 4),
      tokens_per_s_best=round(args.batch * args.seq / best),
      model_gflop_per_s_best=round(flops / best / 1e9, 2),
      matmul_peak_gflop_per_s_best=round(ref[0] / 1e9, 2),
      matmul_peak_gflop_per_s_median=round(ref[1] / 1e9, 2),
      fp32_peak_gflop_per_s_best=round(peak["float32"][0] / 1e9, 2),
      frac_of_peak_best=round(flops / best / ref[0], 3),
      frac_of_peak_median=round(flops / median / ref[1], 3),
      frac_of_fp32_peak_best=round(flops / best / peak["float32"][0], 3),
      attention_frac_of_flops=round(6 * cfg.depth * args.batch * args.seq**2 * cfg.num_heads *
                                    cfg.head_dim / flops, 3),
      loss=float(loss), note=args.note)
  if args.peak_tflops:
    out.update(peak_tflops=args.peak_tflops,
               mfu_best=round(flops / best / (args.peak_tflops * 1e12), 3),
               mfu_median=round(flops / median / (args.peak_tflops * 1e12), 3))
  print(json.dumps(out))


def report_compiled(compiled, cfg, args, compile_s):
  """Prints XLA's view of the compiled step: buffer sizes and FLOPs (next to `step_flops`)."""
  flops, matmul_params = step_flops(cfg, args.batch, args.seq)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = lambda n: round(n / 2**30, 3)
  print(json.dumps(dict(
      **describe(cfg, args), mode="compile_only", matmul_params=matmul_params,
      compile_s=round(compile_s, 2),
      gflop_per_step=round(flops / 1e9, 1),
      xla_gflop_per_step=round(float(cost.get("flops", float("nan"))) / 1e9, 1),
      argument_gib=gib(mem.argument_size_in_bytes), output_gib=gib(mem.output_size_in_bytes),
      alias_gib=gib(mem.alias_size_in_bytes), temp_gib=gib(mem.temp_size_in_bytes),
      peak_gib=gib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                   - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
      note=args.note)))


def bench_generate(model, params, prompts, args):
  mask = np.ones(prompts.shape, bool)
  run = lambda: lm_generate.generate(model, params, prompts, mask, jax.random.key(0),
                                     max_new_tokens=args.generate)[0].block_until_ready()
  t = time.perf_counter()
  run()
  compile_s = time.perf_counter() - t
  times = [_time(run) for _ in range(args.steps)]
  best, median = min(times), float(np.median(times))
  print(json.dumps(dict(
      **describe(model.config, args), mode="generate", prompt=args.seq, new_tokens=args.generate,
      compile_s=round(compile_s, 2), call_s_best=round(best, 4), call_s_median=round(median, 4),
      tokens_per_s_best=round(args.batch * args.generate / best),
      tokens_per_s_median=round(args.batch * args.generate / median), note=args.note)))


if __name__ == "__main__":
  main()
