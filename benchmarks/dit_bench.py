"""DiT flow-matching train step as a fraction of this machine's matmul peak (or MFU), sampling.

  .venv/bin/python benchmarks/dit_bench.py --variant tiny --batch 32 --grid 8 --channels 64 \
      --cond_dim 128 --queries 64            # the demo's DiT (configs/tiny.py, CLIP grid 8)
  .venv/bin/python benchmarks/dit_bench.py --variant S --batch 8

The step is `dit/train.py:loss_fn` for design "fm" without the backbone: the condition is a
random [B, Q, cond_dim] tensor (in the compute dtype) standing in for the LM's query states, so
neither the LM's forward nor the gradient to the queries is timed. Then drop_conditions (10%),
sample_sigma (uniform over 1000 levels), flow_path, the DiT, the MSE, the backward, global-norm
clipping and AdamW (`sharded_trainer.adamw_cosine` and `train_step`), jitted with the state
donated. The reference peak is lm_bench's jitted 2048^3 matmul in the compute dtype (and in
float32), timed between the steps. Prints one JSON line.

FLOPs per image, forward (T = (H/p)(W/p) DiT tokens, Q queries, D width, F SwiGLU width,
E = min(D, 1024) timestep width, P = p*p*C patch features, L layers; 2 FLOPs per multiply-add):
  L * [2T(5D^2 + 3DF)        self q, k, v, out + cross q; SwiGLU gate, up, down (per token)
       + 2Q(2D^2)            cross k, v on the Q projected query tokens
       + 2(4DE)              adaLN modulation (per sample)
       + 4T^2 D + 4TQD]      attention scores and values, self (T x T) and cross (T x Q)
  + 2T(2PD)                  patch embedding, final Linear
  + 2Q(cond_dim D + D^2)     caption projection
  + 2(256E + E^2 + 2DE)      timestep MLP, pooled-caption projection, final adaLN scale
A train step counts 3x forward (the DiT paper's convention; Peebles & Xie's "Gflops" are
fvcore multiply-adds, so their DiT-XL/2's 118.6 is 237 here). Norms, RoPE, softmax and the
optimizer are not counted. `--compile_only` prints XLA's `cost_analysis()` FLOPs beside ours (on
CPU that counts elementwise ops too, and with --scan only one layer body).

  .venv/bin/python benchmarks/dit_bench.py --variant tiny --batch 8 --sample 8

times `sampler.euler_sample` instead (30 steps, guidance 3.0: both branches in one doubled
batch) for `--sample` images, after a compile run: seconds per image over the whole call.

On an accelerator, MFU is against the chip's nominal dense peak (H100/H200 SXM bf16: 989
TFLOP/s). BLIP3-o's DiT (1.365B params, float32 master weights; --compile_only on a CPU: 55.5 GiB
of buffers at batch 64, XLA's FLOPs within 0.2% of ours):

  .venv/bin/python benchmarks/dit_bench.py --variant blip3o --batch 64 --dtype bfloat16 \
      --peak_tflops 989

`--compile_only` lowers and compiles the step with an abstract state (nothing of the model's
size is allocated) and prints XLA's memory analysis: a check, on a CPU, that the command builds.
"""

import argparse
import functools
import json
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lm_bench  # this script's folder is sys.path[0]
from vlbpe_jax import sharded_trainer
from vlbpe_jax.dit import flow
from vlbpe_jax.dit import model as dit_model
from vlbpe_jax.dit import sampler

DTYPES = ("float32", "bfloat16", "float16")
CFG_DROPOUT = 0.1  # configs/tiny.py dit.cfg_dropout
SAMPLE_STEPS, GUIDANCE = 30, 3.0  # BLIP3-o's sampler


def forward_flops(c, queries):
  """(forward FLOPs of one image, of which attention scores/values) for DiTConfig `c`."""
  p = c.patch_size
  t = (c.grid[0] // p) * (c.grid[1] // p)
  q, d, f, e = queries, c.dim, c.ffn_dim, c.temb_dim
  pf = p * p * c.in_channels
  attention = c.depth * (4 * t * t * d + 4 * t * q * d)
  layers = c.depth * (2 * t * (5 * d * d + 3 * d * f) + 2 * q * 2 * d * d + 2 * 4 * d * e)
  outer = 2 * t * 2 * pf * d + 2 * q * (c.cond_dim * d + d * d)
  outer += 2 * (c.t_embed_dim * e + e * e + 2 * d * e)
  return layers + outer + attention, attention


def make_step(net, tx):
  """`(state, batch, key) -> (state, metrics)`: the fm loss of dit/train.py on a given cond."""

  def loss_fn(params, batch, key, frozen):
    del frozen  # no backbone
    x0, cond = batch["x0"], batch["cond"]  # [B, H, W, C], [B, Q, cond_dim]
    k_drop, k_sigma, k_eps = jax.random.split(key, 3)
    cond, _ = flow.drop_conditions(k_drop, cond, CFG_DROPOUT)
    sigma = flow.sample_sigma(k_sigma, x0.shape[0])
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    x_t, target = flow.flow_path(x0, eps, sigma)
    mask = jnp.ones(cond.shape[:2], bool)
    loss = flow.flow_loss(net.apply({"params": params}, x_t, sigma * 1000.0, cond, mask), target)
    return loss, {"loss": loss}

  step = functools.partial(sharded_trainer.train_step, loss_fn=loss_fn, tx=tx)
  return jax.jit(lambda state, batch, key: step(state, batch, key, None), donate_argnums=0)


def config_of(args):
  for name in ("batch", "queries", "steps"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name}={getattr(args, name)}: expected >= 1")
  for name in ("dtype", "param_dtype"):
    if getattr(args, name) not in DTYPES:
      raise ValueError(f"--{name}={getattr(args, name)!r}: expected one of {DTYPES}")
  over = dict(dtype=args.dtype, param_dtype=args.param_dtype, scan_layers=args.scan,
              remat_policy=args.remat)
  for flag, field in (("channels", "in_channels"), ("cond_dim", "cond_dim"),
                      ("patch", "patch_size")):
    if getattr(args, flag) is not None:
      over[field] = getattr(args, flag)
  if args.grid is not None:
    over["grid"] = (args.grid, args.grid)
  c = dit_model.config_for(args.variant, **over)
  if c.grid[0] % c.patch_size:
    raise ValueError(f"--grid={c.grid[0]} is not divisible by --patch={c.patch_size}")
  return c


def describe(c, args, n_params):
  """The fields every result line carries: where it ran and what was measured."""
  return dict(
      device=str(jax.devices()[0].device_kind), machine=platform.processor() or platform.machine(),
      variant=args.variant, dim=c.dim, depth=c.depth, heads=c.heads, ffn=c.ffn_dim,
      grid=list(c.grid), channels=c.in_channels, patch=c.patch_size, cond_dim=c.cond_dim,
      queries=args.queries, params_m=round(n_params / 1e6, 3), batch=args.batch,
      dtype=args.dtype, param_dtype=args.param_dtype, scan=args.scan, remat=args.remat)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="tiny", help="dit/config.py:VARIANTS")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--grid", type=int, help="square target grid H = W (default: the variant's)")
  ap.add_argument("--channels", type=int, help="target channels C (default: the variant's)")
  ap.add_argument("--cond_dim", type=int, help="width of the condition (the LM's)")
  ap.add_argument("--queries", type=int, default=64, help="condition tokens Q (BLIP3-o: 64)")
  ap.add_argument("--patch", type=int, help="patch size p (default 1)")
  ap.add_argument("--dtype", default="float32", help="compute dtype")
  ap.add_argument("--param_dtype", default="float32")
  ap.add_argument("--scan", action="store_true")
  ap.add_argument("--remat", default="none")
  ap.add_argument("--steps", type=int, default=10, help="timed steps (or sampling calls)")
  ap.add_argument("--sample", type=int, default=0, help="time sampling of this many images")
  ap.add_argument("--peak_tflops", type=float,
                  help="the accelerator's nominal peak in the compute dtype: adds `mfu`")
  ap.add_argument("--compile_only", action="store_true",
                  help="compile the train step with an abstract state and report its memory")
  ap.add_argument("--note", default="", help="free text recorded with the result")
  args = ap.parse_args()
  if args.compile_only and args.sample:
    raise ValueError("--compile_only compiles the train step; it cannot go with --sample")
  if args.sample < 0:
    raise ValueError(f"--sample={args.sample}: expected >= 0")
  c = config_of(args)
  net = dit_model.DiT(c)
  b = args.sample or args.batch
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.standard_normal((b,) + c.grid + (c.in_channels,)), jnp.float32)
  cond = jnp.asarray(rng.standard_normal((b, args.queries, c.cond_dim)), args.dtype)
  mask = jnp.ones((b, args.queries), bool)
  init = lambda: nn.unbox(net.init(jax.random.key(0), x0, jnp.zeros((b,)), cond, mask)["params"])
  params = jax.eval_shape(init) if args.compile_only else jax.jit(init)()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  if args.sample:
    return bench_sample(net, params, cond, mask, args, describe(c, args, n_params))
  tx = sharded_trainer.adamw_cosine(lr=1e-4, total_steps=10_000, warmup_steps=30,
                                    final_lr=1e-5, grad_clip=1.0)  # BLIP3-o's
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt": jax.eval_shape(tx.init, params) if args.compile_only else tx.init(params)}
  batch = {"x0": x0, "cond": cond}
  if args.compile_only:
    state, batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch))
  t = time.perf_counter()
  compiled = make_step(net, tx).lower(state, batch, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t
  fwd, attention = forward_flops(c, args.queries)
  flops = 3 * fwd * args.batch
  head = dict(**describe(c, args, n_params), gflop_per_step=round(flops / 1e9, 3),
              compile_s=round(compile_s, 2))
  if args.compile_only:
    return report_compiled(compiled, head, flops, args)
  key = jax.random.key(1)
  state, metrics = compiled(state, batch, key)
  metrics["loss"].block_until_ready()
  # The machine may be shared: interleave the reference matmul with the steps, and report the
  # best step against the best matmul (a quiet moment) as well as median against median.
  peak_fns = {"float32": lm_bench.matmul_fn(jnp.float32)}
  if args.dtype != "float32":
    peak_fns[args.dtype] = lm_bench.matmul_fn(jnp.dtype(args.dtype))
  times, peak_times = [], {k: [] for k in peak_fns}
  for _ in range(args.steps):
    for k, (fn, _) in peak_fns.items():
      peak_times[k].append(lm_bench._time(fn))  # pylint: disable=protected-access
    t = time.perf_counter()
    state, metrics = compiled(state, batch, key)
    metrics["loss"].block_until_ready()
    times.append(time.perf_counter() - t)
  peak = {k: (peak_fns[k][1] / min(v), peak_fns[k][1] / float(np.median(v)))
          for k, v in peak_times.items()}
  best, median = min(times), float(np.median(times))
  ref = peak[args.dtype]
  out = dict(
      **head, step_s_median=round(median, 4), step_s_best=round(best, 4),
      images_per_s_best=round(args.batch / best, 2),
      model_gflop_per_s_best=round(flops / best / 1e9, 2),
      matmul_peak_gflop_per_s_best=round(ref[0] / 1e9, 2),
      matmul_peak_gflop_per_s_median=round(ref[1] / 1e9, 2),
      fp32_peak_gflop_per_s_best=round(peak["float32"][0] / 1e9, 2),
      frac_of_peak_best=round(flops / best / ref[0], 3),
      frac_of_peak_median=round(flops / median / ref[1], 3),
      frac_of_fp32_peak_best=round(flops / best / peak["float32"][0], 3),
      attention_frac_of_flops=round(attention / fwd, 3), loss=float(metrics["loss"]),
      note=args.note)
  if args.peak_tflops:
    out.update(peak_tflops=args.peak_tflops,
               mfu_best=round(flops / best / (args.peak_tflops * 1e12), 3),
               mfu_median=round(flops / median / (args.peak_tflops * 1e12), 3))
  print(json.dumps(out))


def report_compiled(compiled, head, flops, args):
  """Prints XLA's view of the compiled step: buffer sizes and FLOPs (next to ours)."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = float(cost.get("flops", float("nan")))
  gib = lambda n: round(n / 2**30, 3)
  print(json.dumps(dict(
      **head, mode="compile_only", xla_gflop_per_step=round(xla / 1e9, 3),
      ours_over_xla=round(flops / xla, 3),
      argument_gib=gib(mem.argument_size_in_bytes), output_gib=gib(mem.output_size_in_bytes),
      alias_gib=gib(mem.alias_size_in_bytes), temp_gib=gib(mem.temp_size_in_bytes),
      peak_gib=gib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                   - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
      note=args.note)))


def bench_sample(net, params, cond, mask, args, head):
  """Times `euler_sample` for cond.shape[0] images; one JSON line with seconds per image."""
  c = net.config
  fn = lambda p, x, t, y, m: net.apply({"params": p}, x, t, y, m)  # noqa: E731
  shape = (cond.shape[0],) + c.grid + (c.in_channels,)
  sample = jax.jit(lambda p, key, y, m: sampler.euler_sample(
      functools.partial(fn, p), key, shape, cond=y, cond_mask=m, steps=SAMPLE_STEPS,
      guidance=GUIDANCE))
  run = lambda: sample(params, jax.random.key(0), cond, mask).block_until_ready()  # noqa: E731
  compile_s = lm_bench._time(run)  # pylint: disable=protected-access
  times = [lm_bench._time(run) for _ in range(args.steps)]  # pylint: disable=protected-access
  best, median = min(times), float(np.median(times))
  n = shape[0]
  flops = forward_flops(c, args.queries)[0] * SAMPLE_STEPS * (2 if GUIDANCE != 1.0 else 1)
  head.update(batch=n)
  print(json.dumps(dict(
      **head, mode="sample", sample_steps=SAMPLE_STEPS, guidance=GUIDANCE,
      gflop_per_image=round(flops / 1e9, 3), compile_s=round(compile_s, 2),
      call_s_best=round(best, 4), call_s_median=round(median, 4),
      s_per_image_best=round(best / n, 5), s_per_image_median=round(median / n, 5),
      model_gflop_per_s_best=round(flops * n / best / 1e9, 2), note=args.note)))


if __name__ == "__main__":
  main()
