"""Generates images for prompts with a trained BLIP3-o generator of a pipeline workdir.

  python -m vlbpe_jax.dit.sample --workdir=$W --prompts=prompts.txt --outdir=OUT \\
      --num_samples=4 --cfg=3.0 [--design=fm] [--steps=30] [--seed=0]

prompts.txt: one caption per line (blank lines are refused, as are prompts longer than the
prompt context `dit.prompt_len` with the template). Writes OUT/<line number>_<i>.png for each
prompt (i = 0 .. num_samples - 1) and OUT/prompts.json; prompts are generated in batches. The
config is the one the design was trained with (saved in its checkpoint).
"""

import json
import os

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
from PIL import Image

from vlbpe_jax import checkpoint
from vlbpe_jax import cli
from vlbpe_jax import fileio
from vlbpe_jax.dit import decoder as decoder_lib
from vlbpe_jax.dit import train


def read_prompts(path: str) -> list[str]:
  """Non-empty lines of a UTF-8 text file; ValueError naming a blank line or an empty file."""
  if not os.path.isfile(path):
    raise ValueError(f"--prompts={path!r}: no such file")
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except UnicodeDecodeError as e:
    raise ValueError(f"--prompts={path!r}: not UTF-8 text ({e})") from None
  while lines and not lines[-1].strip():
    lines.pop()
  if not lines:
    raise ValueError(f"--prompts={path!r}: no prompts; expected one caption per line")
  blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
  if blank:
    raise ValueError(f"--prompts={path!r}: line(s) {blank} are empty; expected one caption "
                     "per line")
  return [line.strip() for line in lines]


def saved_config(workdir: str, design: str):
  path = os.path.join(workdir, "dit", design, "ckpt")
  with checkpoint.Checkpointer(path, async_save=False) as ckpt:
    if ckpt.latest_step() is None:
      raise ValueError(f"--workdir={workdir!r}: no checkpoint of design {design!r} in {path}; "
                       "run the pipeline's 'dit' stage (or python -m vlbpe_jax.dit.train) first")
    return ml_collections.ConfigDict(ckpt.saved_config())


def sample(workdir, prompts, outdir, *, design="fm", num_samples=4, cfg=3.0, steps=None,
           seed=0, batch_size=16) -> list[str]:
  """Writes the PNGs; returns their paths (prompt-major)."""
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples}: expected >= 1")
  config = saved_config(workdir, design)
  s = train.load_setup(config, workdir, design)
  s.backbone.encode(prompts, config)  # refuses bad prompts before any compilation
  state = train.restore(s)
  gen = train.generate(config, s, state["params"], prompts, jax.random.key(seed),
                       num_samples=num_samples, steps=steps, guidance=cfg,
                       batch_size=batch_size)  # [P, S, H, W, C]
  flat = gen.reshape((-1,) + gen.shape[2:])
  if design == "vq_latent":
    from vlbpe_jax.vq import tokenizer as vq_tokenizer  # pylint: disable=g-import-not-at-top
    vq = vq_tokenizer.Tokenizer.from_workdir(workdir, mesh=s.trainer.mesh)
    images = vq.decode(train.vq_codes_of(vq, flat))
  else:
    dec, params = decoder_lib.restore(config, workdir, s.trainer.mesh)
    images = decoder_lib.decode(dec, params, flat)
  paths = []
  for k, im in enumerate(images):
    p, i = divmod(k, num_samples)
    path = os.path.join(outdir, f"{p:04d}_{i}.png")
    with fileio.atomic_file(path) as tmp:
      Image.fromarray(np.asarray(im)).save(tmp, format="PNG")
    paths.append(path)
  fileio.write_json(os.path.join(outdir, "prompts.json"),
                    {"design": design, "cfg": cfg, "num_samples": num_samples,
                     "prompts": prompts})
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  jax.config.update("jax_threefry_partitionable", True)
  f = flags.FLAGS
  paths = sample(f.workdir, read_prompts(f.prompts), f.outdir, design=f.design,
                 num_samples=f.num_samples, cfg=f.cfg, steps=f.steps, seed=f.seed)
  print(json.dumps({"images": len(paths), "outdir": f.outdir}))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Pipeline directory holding dit/<design>/.")
  flags.DEFINE_string("prompts", None, "Text file: one caption per line.")
  flags.DEFINE_string("outdir", None, "Where the PNGs go.")
  flags.DEFINE_enum("design", "fm", train.DESIGNS, "Which trained design samples.")
  flags.DEFINE_integer("num_samples", 4, "Samples per prompt.")
  flags.DEFINE_float("cfg", 3.0, "Classifier-free guidance scale (1 = none).")
  flags.DEFINE_integer("steps", None, "Euler steps (default: the config's dit.sample_steps).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.mark_flags_as_required(["workdir", "prompts", "outdir"])
  cli.run(main)
