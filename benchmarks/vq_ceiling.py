"""The scene checker on the VQ's own reconstructions of the test images, beside the real ones.

  PYTHONPATH=.:tests .venv/bin/python benchmarks/vq_ceiling.py W

W: a finished demo workdir (its data and vq stages). decoder(encoder(real test image)) through
the VQ is the ceiling of the DiT's `vq_latent` design, as decoder(CLIP(real)) is the CLIP
designs'; side by side they show how much of each criterion (shape above all) the 16x16 codes
keep against the CLIP's 8x8 grid features. BENCHMARKS.md, "Why CLIP + FM fails here".
"""

import json
import os
import sys

from test_main import ROOT, load_config
from vlbpe_jax.data import stage as data_stage
from vlbpe_jax.eval import generation
from vlbpe_jax.vq import tokenizer as vq_tokenizer


def main(workdir):
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  test = data_stage.load_scenes(config, workdir, "test")
  vq = vq_tokenizer.Tokenizer.from_workdir(workdir)
  n = min(int(config.dit.num_eval), len(test["images"]))
  recon = vq.decode(vq.encode(test["images"]))
  out = {}
  for name, images, k in (("vq_stage", recon, n), ("vq_test", recon, len(recon)),
                          ("real_test", test["images"], len(recon))):
    g = generation.geneval(images[:k], test["objects"][:k])
    out[name] = {m: round(g[m], 3) for m in generation.CRITERIA + ("overall", "overall_se", "n")}
  print(json.dumps(out))


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit(__doc__)
  main(sys.argv[1])
