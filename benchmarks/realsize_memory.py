"""Per-device memory of the real-size configs on their targets, as a markdown table.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python \
      benchmarks/realsize_memory.py                  # every config x target (BENCHMARKS.md)
  .venv/bin/python benchmarks/realsize_memory.py \
      --config=configs/beingvl_8b.py:target=v6e-64,remat=dots

Each step is built on an abstract mesh of the target's shape and lowered (vlbpe_jax/aot.py):
nothing of the model's size is allocated. State = params + AdamW moments (fp32) per device, as
sharded; frozen = inputs the step reads but never trains (the DiT's LM, V2L's CLIP table);
activations = `aot.activation_bytes`' estimate (XLA's temp bytes where `--compile` builds the
step on this machine's devices, which must number the target's chips).
"""

import argparse
import os
import time

import jax

from vlbpe_jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ("v5p-64", "v6e-64", "h100x8")
# (config file, extra args); H100 lowers attention_impl="xla" (cuDNN cannot be traced here).
DEFAULT = [(f, r) for f in ("beingvl_8b.py", "beingvl_1b.py") for r in ("", ",remat=dots")] + [
    ("blip3o_dit.py", ""), ("v2l_llama2_7b.py", "")]


def specs():
  for name, extra in DEFAULT:
    for t in TARGETS:
      att = ",attention=xla" if t == "h100x8" and name.startswith("beingvl") else ""
      yield os.path.join("configs", name) + f":target={t}{extra}{att}"


def row(spec, compile_):
  t0 = time.perf_counter()
  config = aot.load(os.path.join(ROOT, spec) if not os.path.isabs(spec) else spec)
  job = aot.build(config, devices=jax.devices() if compile_ else None)
  lowered = aot.lower(job, "cpu" if compile_ else None)
  m = aot.memory(job)
  acts = f"{m['activations']:.1f} est."
  if compile_:
    mem = lowered.compile().memory_analysis()
    acts += f" / {mem.temp_size_in_bytes / aot.GIB:.1f} XLA"
  mesh = " ".join(f"{a}={s}" for a, s in job.mesh.shape.items())
  remat = config.get(config.stages).get("model", {}).get("remat_policy", "-")
  verdict = "yes" if m["fits"] else "**no**"
  return (f"| `{spec.split('/')[-1]}` | {config.target.chip} x{config.target.devices} | {mesh} | "
          f"{m['param_count'] / 1e9:.2f}B | {config[config.stages].batch_size} | {remat} | "
          f"{m['params'] + m['opt']:.2f} | {m['frozen']:.2f} | {acts} | {m['total']:.1f} | "
          f"{m['hbm']:.0f} | {verdict} |"), time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", action="append", help="path:arg (default: the table's rows)")
  ap.add_argument("--compile", action="store_true",
                  help="also compile on this machine's devices (XLA's temp bytes)")
  args = ap.parse_args()
  print("| config | target | mesh | params | batch | remat | state GiB/dev | frozen | "
        "activations GiB/dev | total | HBM | fits |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  total = 0.0
  for spec in args.config or specs():
    line, seconds = row(spec, args.compile)
    total += seconds
    print(line, flush=True)
  print(f"\n{jax.device_count()} {jax.devices()[0].platform} devices here; {total:.0f} s")


if __name__ == "__main__":
  main()
