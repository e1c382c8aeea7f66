"""The demo's BPE stage on fake VQ codes: outputs, report section, resume."""

import json
import os

import ml_collections
import numpy as np

from vlbpe_jax.bpe import VisualBPE
from vlbpe_jax.bpe import stage


def _config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(resolution=32)
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  c.vq = dict(codebook_size=16)
  c.bpe = dict(num_merges=10, alpha=1.0, sigma=0.5, offsets=((0, 1), (1, 0)), min_count=2,
               base_vocab_size=0, num_token_maps=2)
  return c


def test_stage_learns_encodes_reports_and_resumes(tmp_path):
  workdir = str(tmp_path)
  os.makedirs(tmp_path / "vq")
  rng = np.random.default_rng(0)
  patch = rng.integers(0, 16, (2, 2))
  for split, n in (("train", 16), ("validation", 4), ("test", 4)):
    g = np.tile(patch, (n, 4, 4)).astype(np.int32)  # [n, 8, 8]
    g[rng.random(g.shape) < 0.1] = 3
    np.save(tmp_path / "vq" / f"codes_{split}.npy", g)
  metrics = stage.run_stage(_config(), workdir)
  assert metrics["bpe.compression"] > 1.5 and metrics["bpe.vocab_size"] == 16 + 10
  bpe = VisualBPE.load(str(tmp_path / "bpe" / "bpe.json"))
  for split in ("train", "validation", "test"):
    with np.load(tmp_path / "bpe" / f"tokens_{split}.npz") as f:
      codes = np.load(tmp_path / "vq" / f"codes_{split}.npy")
      np.testing.assert_array_equal(bpe.decode({k: f[k] for k in f.files}), codes)
  report = json.load(open(tmp_path / "report" / "metrics.json"))
  assert report["bpe.compression"] == metrics["bpe.compression"]
  assert (tmp_path / "report" / "bpe" / "token_map.png").exists()
  assert "token_map.png" in open(tmp_path / "report" / "index.html").read()
  stamp = os.path.getmtime(tmp_path / "bpe" / "bpe.json")
  assert stage.run_stage(_config(), workdir) == metrics  # resumed: nothing relearned
  assert os.path.getmtime(tmp_path / "bpe" / "bpe.json") == stamp
  changed = _config()
  changed.bpe.alpha = 0.0
  stage.run_stage(changed, workdir)
  assert VisualBPE.load(str(tmp_path / "bpe" / "bpe.json")).alpha == 0.0


def test_stage_passes_s_prior_count_and_relearns_when_it_changes(tmp_path):
  os.makedirs(tmp_path / "vq")
  g = np.tile(np.arange(4).reshape(2, 2), (8, 2, 2)).astype(np.int32)  # [8, 4, 4]
  np.save(tmp_path / "vq" / "codes_train.npy", g)
  config = _config()
  stage.run_stage(config, str(tmp_path))  # no s_prior_count in the config: 0
  assert VisualBPE.load(str(tmp_path / "bpe" / "bpe.json")).s_prior_count == 0.0
  config.bpe.s_prior_count = 4.0
  stage.run_stage(config, str(tmp_path))
  assert VisualBPE.load(str(tmp_path / "bpe" / "bpe.json")).s_prior_count == 4.0
