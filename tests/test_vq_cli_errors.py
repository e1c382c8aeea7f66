"""VQ tokenizer and its CLIs on bad input: errors name the file, the shape and what was expected.

No checkpoint needed: the checks run before (or without) restoring parameters.
"""

import importlib.util
import os

import numpy as np
from PIL import Image
import pytest

from vlbpe_jax.vq import decode
from vlbpe_jax.vq import encode
from vlbpe_jax.vq import tokenizer

_spec = importlib.util.spec_from_file_location(
    "vq_tiny", os.path.join(os.path.dirname(__file__), "..", "configs", "vq_tiny.py"))
vq_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vq_tiny)


def _png(path, size=(32, 32), mode="RGB"):
  channels = len(mode)
  Image.fromarray(np.full((size[1], size[0], channels), 200, np.uint8), mode).save(path)


def test_truncated_png_is_named(tmp_path):
  good, torn = str(tmp_path / "good.png"), str(tmp_path / "torn.png")
  _png(good)
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(torn)
  data = open(torn, "rb").read()
  open(torn, "wb").write(data[:len(data) // 2])
  assert encode.read_images([good], 32).shape == (1, 32, 32, 3)
  with pytest.raises(ValueError, match="torn.png") as e:
    encode.read_images([good, torn], 32)
  assert "truncated" in str(e.value)
  open(torn, "wb").write(b"not a png")
  with pytest.raises(ValueError, match="torn.png"):
    encode.read_images([torn], 32)


def test_images_are_read_before_the_checkpoint(tmp_path):
  """A bad image fails fast, naming itself, even before the workdir is looked at."""
  (tmp_path / "images").mkdir()
  _png(str(tmp_path / "images" / "00000.png"))
  _png(str(tmp_path / "images" / "00001.png"), size=(16, 32))
  with pytest.raises(ValueError, match=r"00001.png: size 16x32; expected 32x32"):
    encode.encode_dir(str(tmp_path / "no_run"), str(tmp_path), str(tmp_path / "c.npy"))


@pytest.fixture(scope="module")
def tok():
  return tokenizer.Tokenizer(vq_tiny.get_config("tiny"), None)  # no parameters needed


def test_code_grid_must_match_the_tokenizer(tok):
  assert tok.grid == (8, 8) and tok.codebook_size == 64
  assert tok.check_codes(np.zeros((2, 8, 8), np.int64)).dtype == np.int32
  with pytest.raises(ValueError, match=r"\(grid 4x4\): expected \[N, 8, 8\]"):
    tok.check_codes(np.zeros((2, 4, 4), np.int32))
  with pytest.raises(ValueError, match=r"\(grid 4x4\): expected \[N, 8, 8\]"):
    tok.decode(np.zeros((2, 4, 4), np.int32))  # before: decoded to 16x16 images
  with pytest.raises(ValueError, match=r"outside \[0, 64\) .*first at index \(1, 2, 3\): -1"):
    tok.check_codes(np.zeros((2, 8, 8), np.int32) - (np.arange(128) == 83).reshape(2, 8, 8))
  with pytest.raises(ValueError, match=r"values outside \[0, 64\)"):
    tok.check_codes(np.full((1, 8, 8), 2**40))
  with pytest.raises(ValueError, match="dtype float32"):
    tok.check_codes(np.zeros((1, 8, 8), np.float32))


@pytest.mark.parametrize("content,match", [
    (b"", "cannot be read as .npy"),
    (None, r"shape \(8, 8\): expected \[N, h, w\]"),
    ("float", "dtype float32"),
    ("negative", r"outside \[0, "),
])
def test_decode_file_names_bad_codes_before_loading_the_checkpoint(tmp_path, content, match):
  path = str(tmp_path / "codes.npy")
  if content is None:
    np.save(path, np.zeros((8, 8), np.int32))
  elif content == "float":
    np.save(path, np.zeros((1, 8, 8), np.float32))
  elif content == "negative":
    np.save(path, np.full((1, 8, 8), -5, np.int32))
  else:
    open(path, "wb").write(content)
  with pytest.raises(ValueError, match=match) as e:
    decode.decode_file(str(tmp_path / "no_run"), path, str(tmp_path / "out"))
  assert path in str(e.value)
