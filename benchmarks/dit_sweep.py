"""One lever of the BLIP3-o stage, measured on a finished demo workdir's data, LM, CLIP and decoder.

  PYTHONPATH=.:tests .venv/bin/python benchmarks/dit_sweep.py NAME [config.key=value ...]
  e.g. ... dit_sweep.py fm_x4 'dit.designs=("fm",)' dit.lr=2e-3 dit.total_steps=2400

Trains each design of `dit.designs` under `/tmp/ditsweep/NAME/dit/<design>` (the frozen `full`
LM, the CLIP and the pixel decoder come from --workdir, default runs/demo), samples 2 images for
each of the first 32 test captions and scores them with the scene checker as the stage does.
Appends one JSON line to benchmarks/dit_sweep.jsonl and writes a sample grid PNG per design.
"""

import json
import os
import sys
import time

import jax
from PIL import Image

from test_main import ROOT, load_config
from vlbpe_jax.dit import decoder as decoder_lib
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


def main(name, overrides, workdir=os.path.join(ROOT, "runs", "demo")):
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  config.dit.progress = False
  for item in overrides:
    _override(config, item)
  t0 = time.time()
  ctx = stage._Context(config, workdir)  # pylint: disable=protected-access
  ctx.prompts, ctx.objects = ctx.prompts[:32], ctx.objects[:32]
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
                         num_samples=2)
    flat = gen.reshape((-1,) + gen.shape[2:])
    images = decoder_lib.decode(dec, dec_params, flat).reshape(gen.shape[:2] + (64, 64, 3))
    sc, _ = stage._scores(images, ctx.objects)  # pylint: disable=protected-access
    out[design] = {"train_s": round(train_s, 1), "overall": round(sc["all"]["overall"], 3),
                   **{k: round(sc["all"][k], 3) for k in generation.CRITERIA}}
    Image.fromarray(report.image_grid(images[:8].reshape((-1, 64, 64, 3)), 2)).save(
        f"/tmp/ditsweep/{name}_{design}.png")
  print(json.dumps(out))
  with open(os.path.join(ROOT, "benchmarks", "dit_sweep.jsonl"), "a") as f:
    f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
