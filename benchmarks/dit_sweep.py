"""One lever of the BLIP3-o stage, measured on a finished demo workdir's data, LM, CLIP and decoder.

  PYTHONPATH=.:tests .venv/bin/python benchmarks/dit_sweep.py NAME [workdir=W] [key=value ...]
  e.g. ... dit_sweep.py fm_x4 workdir=/tmp/fd7/runs/demo 'dit.designs=("fm",)' dit.total_steps=2400

Trains and scores each design of `dit.designs` with the stage's own code (`dit/stage._design`)
in `/tmp/ditsweep/NAME/`, which links to `workdir=`'s finished stages (default runs/demo: the
frozen `full` LM, the CLIP, the pixel decoder): `dit.num_samples` images for each of the first
`dit.num_eval` test captions, scored by the scene checker against their own prompt and against
the next prompt's scene (`generation.wrong_prompt_control`; a generator that ignores its prompt
scores the same on both). For fm also the flow loss on the first 256 test (CLIP feature,
caption) pairs at sigma 0.25 / 0.5 / 0.75 with the right condition, another caption's (rolled
by one) and the zeroed one (the unconditional branch): the gap is what the DiT takes from its
condition. Appends one JSON line to benchmarks/dit_sweep.jsonl and writes a sample grid PNG per
design. (Lines before commit ee3acda came from a copy of the stage's steps that sampled
with key 0 and refused `vq_latent`; the stage samples with its own key per design.)
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

# The stages a design reads, linked from the source workdir.
LINKS = ("data", "tokenizer", "vq", "bpe", "lm", "clip", "pixel_decoder", "manifests")


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


def linked_workdir(out, src):
  """`out` with links to `src`'s finished stages up to the DiT (data ... pixel decoder), so
  that a design trained in `out` reads them and writes only its own `out/dit/<design>/`."""
  os.makedirs(out, exist_ok=True)
  for d in LINKS:
    if not os.path.lexists(os.path.join(out, d)):
      os.symlink(os.path.abspath(os.path.join(src, d)), os.path.join(out, d))
  return out


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
  out_dir = linked_workdir(f"/tmp/ditsweep/{name}", workdir)
  ctx = stage._Context(config, out_dir)  # pylint: disable=protected-access
  dec, dec_params = decoder_lib.restore(config, out_dir, ctx.mesh)
  out = {"name": name, "overrides": overrides, "load_s": round(time.time() - t0, 1)}
  for design in config.dit.designs:
    t = time.time()
    res, images = stage._design(ctx, design, dec, dec_params)  # pylint: disable=protected-access
    sc = res["scores"]
    out[design] = {"s": round(time.time() - t, 1), "train_s": round(res["train_seconds"], 1),
                   "overall": round(sc["all"]["overall"], 3),
                   "overall_se": round(sc["all"]["overall_se"], 3),
                   "wrong_prompt": round(res["wrong_prompt"]["overall"], 3),
                   "single": round(sc["single"]["overall"], 3),
                   **{k: round(sc["all"][k], 3) for k in generation.CRITERIA},
                   "fid_clip": round(res["fid_clip"], 1)}
    if design == "fm":  # the flow loss's condition gap, on the CLIP targets it trains on
      s = train.load_setup(config, out_dir, design, backbone=ctx.backbone, mesh=ctx.mesh)
      out[design]["loss"] = _loss_gap(config, s, train.restore(s)["params"], ctx)
    r = images.shape[2]
    Image.fromarray(report.image_grid(images[:8].reshape((-1, r, r, 3)), 2)).save(
        f"/tmp/ditsweep/{name}_{design}.png")
  print(json.dumps(out))
  with open(os.path.join(ROOT, "benchmarks", "dit_sweep.jsonl"), "a") as f:
    f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
