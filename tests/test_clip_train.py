"""The CLIP trainer's levers (clip.hard_negatives, clip.twin_images, clip.model.conv_stem) on 8
fake devices."""

import os

import pytest
from test_main import ROOT, load_config

from vlbpe_jax import manifest
from vlbpe_jax import summary
from vlbpe_jax.clip import train
from vlbpe_jax.data import stage as data_stage


def _config(**clip):
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")
  config.clip.total_steps = 2
  for k, v in clip.items():
    config.clip[k] = v
  return config


def _workdirs(tmp_path, *names):
  """Workdirs sharing one data stage's output (symlinked), for CLIP runs side by side."""
  src = str(tmp_path / "src")
  data_stage.run_stage(_config(), src)
  out = []
  for name in names:
    out.append(str(tmp_path / name))
    os.makedirs(out[-1])
    for d in ("data", "tokenizer"):
      os.symlink(os.path.join(src, d), os.path.join(out[-1], d))
  return out


def _first_row(run_dir):
  return [r for r in summary.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
          if "train/loss" in r][0]


def test_hard_negatives_add_columns_and_key_the_checkpoint(tmp_path):
  plain, hard = _workdirs(tmp_path, "plain", "hard")
  train.train(_config(), plain)
  train.train(_config(hard_negatives=("shape",)), hard)
  p, h = _first_row(os.path.join(plain, "clip")), _first_row(os.path.join(hard, "clip"))
  assert "train/hard_neg_acc" not in p and 0.0 <= h["train/hard_neg_acc"] <= 1.0
  # Same init and first batch: the negatives' columns can only raise image->text's logsumexp.
  assert h["train/loss"] > p["train/loss"] + 1e-4, (h["train/loss"], p["train/loss"])
  # A checkpoint trained without negatives is not resumed as one with them.
  with pytest.raises(ValueError, match="hard_negatives"):
    train.train(_config(hard_negatives=("shape",), total_steps=3), plain)


def test_bad_hard_negatives_raise():
  for bad in (("size",), ("shape", "shape")):
    with pytest.raises(ValueError, match="clip.hard_negatives"):
      train.check_config(_config(hard_negatives=bad))


def test_twin_images_double_the_pairs_and_key_the_checkpoint(tmp_path):
  plain, twin = _workdirs(tmp_path, "plain", "twin")
  train.train(_config(), plain)
  model, _, state = train.train(_config(twin_images=("shape",)), twin)
  p, t = _first_row(os.path.join(plain, "clip")), _first_row(os.path.join(twin, "clip"))
  # Same init: twice the pairs per step (each scene and its twin) raise InfoNCE's log(2B) floor.
  assert t["train/loss"] > p["train/loss"] + 0.3, (t["train/loss"], p["train/loss"])
  assert model.config.conv_stem == ()
  assert int(state["step"]) == 2
  with pytest.raises(ValueError, match="twin_images"):
    train.train(_config(twin_images=("color",), total_steps=3), twin)


def test_bad_twin_images_raise():
  for bad in (("size",), ("color", "color")):
    with pytest.raises(ValueError, match="clip.twin_images"):
      train.check_config(_config(twin_images=bad))
  with pytest.raises(ValueError, match="one of the two"):
    train.check_config(_config(twin_images=("shape",), hard_negatives=("shape",)))


def test_the_cli_can_set_the_levers_and_their_defaults_change_no_key():
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  before = manifest.config_dict(config)["clip"]
  config.lock()  # as config_flags hands it over: only existing fields can be overridden
  config.clip.model.conv_stem = (16, 32, 64)
  config.clip.twin_images = ("shape",)
  after = manifest.config_dict(config)["clip"]
  assert "conv_stem" not in before["model"] and "twin_images" not in before
  assert after["model"]["conv_stem"] == [16, 32, 64] and after["twin_images"] == ["shape"]
