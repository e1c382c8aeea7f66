"""One lever of the BLIP3-o stage, measured on a finished demo workdir's data, LM, CLIP and decoder.

  PYTHONPATH=.:tests .venv/bin/python benchmarks/dit_sweep.py NAME [workdir=W] [key=value ...]
  e.g. ... dit_sweep.py fm_x4 workdir=/tmp/fd7/runs/demo 'dit.designs=("fm",)' dit.total_steps=2400

Trains each design of `dit.designs` under `/tmp/ditsweep/NAME/dit/<design>` (the frozen `full`
LM, the CLIP and the pixel decoder come from `workdir=`, default runs/demo), then, as the stage
does, samples `dit.num_samples` images for each of the first `dit.num_eval` test captions and
scores them with the scene checker: against their own prompt and against the next prompt's scene
(`generation.wrong_prompt_control`; a generator that ignores its prompt scores the same on both).
Also the flow loss on the first 256 test (CLIP feature, caption) pairs at sigma 0.25 / 0.5 /
0.75 with the right condition, another caption's (rolled by one) and the zeroed one (the
unconditional branch): the gap is what the DiT takes from its condition. Appends one JSON line
to benchmarks/dit_sweep.jsonl and writes a sample grid PNG per design.
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from test_main import ROOT, load_config
from vlbpe_jax.dit import decoder as decoder_lib
from vlbpe_jax.dit import flow
from vlbpe_jax.dit import queries
from vlbpe_jax.dit import stage
from vlbpe_jax.dit import targets
from vlbpe_jax.dit import train
from vlbpe_jax.eval import generation
from vlbpe_jax.eval import report


def _override(config, item):
  key, value = item.split("=", 1)
  *path, leaf = key.split(".")
  node = config
  for p in path:
    node = node[p]
  old = node[leaf]
  node[leaf] = value if isinstance(old, str) else type(old)(eval(value))  # noqa: S307


def _loss_gap(config, s, params, ctx):
  """Mean flow loss on test pairs with the right, a rolled and the zeroed condition."""
  n = min(256, len(ctx.test["images"]))
  feats = targets.standardise(ctx.clip_grid(ctx.test["images"][:n]), s.stats)
  ids, mask = s.backbone.encode([c[0] for c in ctx.test["captions"][:n]], config)
  with s.trainer.ctx():
    cond = jax.jit(lambda q, bp, i, m: queries.query_states(
        s.backbone.model, bp, q, i, m, grid=s.backbone.grid))(
            params["queries"], s.backbone.params, ids, mask)
    net = jax.jit(lambda x, t, y: s.net.apply({"params": params["net"]}, x, t, y,
                                              jnp.ones(y.shape[:2], bool)))
    out = {}
    for sig in (0.25, 0.5, 0.75):
      sigma = jnp.full((n,), sig)
      for r in range(2):
        eps = jax.random.normal(jax.random.key(r), feats.shape)
        x_t, target = flow.flow_path(jnp.asarray(feats, jnp.float32), eps, sigma)
        for kind, y in (("right", cond), ("rolled", jnp.roll(cond, 1, axis=0)),
                        ("zero", jnp.zeros_like(cond))):
          out.setdefault(kind, []).append(float(flow.flow_loss(net(x_t, sigma * 1000, y),
                                                               target)))
  return {k: round(float(np.mean(v)), 4) for k, v in out.items()}


def main(name, overrides):
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  config.dit.progress = False
  workdir = os.path.join(ROOT, "runs", "demo")
  for item in overrides:
    if item.startswith("workdir="):
      workdir = item.split("=", 1)[1]
    else:
      _override(config, item)
  t0 = time.time()
  ctx = stage._Context(config, workdir)  # pylint: disable=protected-access
  dec, dec_params = decoder_lib.restore(config, workdir, ctx.mesh)
  out = {"name": name, "overrides": overrides, "load_s": round(time.time() - t0, 1)}
  if "vq_latent" in config.dit.designs:
    raise ValueError(f"dit.designs={config.dit.designs}: this sweep covers the CLIP-feature "
                     "designs ('fm', 'mse'); the stage itself runs 'vq_latent'")
  for design in config.dit.designs:
    x0 = ctx.train_feats
    s = train.setup(config, f"/tmp/ditsweep/{name}", design, shape=x0.shape[1:],
                    stats=targets.stats_of(x0), backbone=ctx.backbone, mesh=ctx.mesh)
    t = time.time()
    state = train.train(config, s, ctx.train["captions"], x0)
    train_s = time.time() - t
    gen = train.generate(config, s, state["params"], ctx.prompts, jax.random.key(0),
                         num_samples=int(config.dit.num_samples))
    flat = gen.reshape((-1,) + gen.shape[2:])
    images = decoder_lib.decode(dec, dec_params, flat).reshape(gen.shape[:2] + (64, 64, 3))
    sc, _ = stage._scores(images, ctx.objects)  # pylint: disable=protected-access
    wrong = generation.wrong_prompt_control(images, ctx.objects)
    out[design] = {"train_s": round(train_s, 1), "overall": round(sc["all"]["overall"], 3),
                   "overall_se": round(sc["all"]["overall_se"], 3),
                   "wrong_prompt": round(wrong["overall"], 3),
                   "single": round(sc["single"]["overall"], 3),
                   **{k: round(sc["all"][k], 3) for k in generation.CRITERIA},
                   **({} if design == "mse" else
                      {"loss": _loss_gap(config, s, state["params"], ctx)})}
    Image.fromarray(report.image_grid(images[:8].reshape((-1, 64, 64, 3)), 2)).save(
        f"/tmp/ditsweep/{name}_{design}.png")
  print(json.dumps(out))
  with open(os.path.join(ROOT, "benchmarks", "dit_sweep.jsonl"), "a") as f:
    f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
