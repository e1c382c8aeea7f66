"""Bad inputs to the bpe, vq and scene checker CLIs: one `error:` line naming the input, exit 2.

Each case runs the CLI as a subprocess on a file it breaks in tmp_path (missing, empty,
truncated, wrong dtype or shape, out-of-range values, edited) and checks that stderr ends in
`error: ...` naming the input, with no traceback. Each subprocess imports jax (seconds), so
the file is marked slow.
"""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from vlbpe_jax.bpe import VisualBPE
from vlbpe_jax.data import shapes

pytestmark = pytest.mark.slow

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, **env_vars):
  env = {k: v for k, v in os.environ.items() if k != "VLBPE_TRACEBACK"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=_ROOT, **env_vars)
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        env=env, cwd=_ROOT, timeout=300)


def _assert_one_line_error(proc, *names):
  lines = proc.stderr.strip().splitlines()
  print(proc.stderr[-2000:])  # shown when a case fails (and with -rP)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
  for name in names:
    assert str(name) in lines[-1], (name, lines[-1])


def _torn(path, src):
  data = open(src, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


def _codes(tmp_path, kind):
  """A codes .npy broken in one way; returns its path."""
  path = str(tmp_path / f"codes_{kind}.npy")
  good = np.random.default_rng(0).integers(0, 16, (4, 6, 6)).astype(np.int32)
  if kind == "empty":
    open(path, "wb").close()
  elif kind == "truncated":
    np.save(str(tmp_path / "whole.npy"), good)
    _torn(path, str(tmp_path / "whole.npy"))
  elif kind == "float":
    np.save(path, good.astype(np.float32))
  elif kind == "flat":
    np.save(path, good.reshape(-1))
  elif kind == "negative":
    np.save(path, good - 20)
  elif kind == "huge":
    np.save(path, good.astype(np.int64) + 2**40)
  elif kind == "no_grids":
    np.save(path, good[:0])
  elif kind != "missing":
    raise ValueError(kind)
  return path


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "float", "negative", "huge",
                                  "no_grids"])
def test_bpe_learn(tmp_path, kind):
  path = _codes(tmp_path, kind)
  proc = _run("vlbpe_jax.bpe.learn", f"--codes={path}", "--merges=3", "--no_progress",
              f"--out={tmp_path / 'bpe.json'}")
  _assert_one_line_error(proc, path)
  assert not (tmp_path / "bpe.json").exists()


def test_bpe_learn_names_a_bad_distributed_flag(tmp_path):
  # The numpy-only learner reads the flag itself (to import jax only for several hosts).
  path = str(tmp_path / "codes.npy")
  np.save(path, np.zeros((2, 3, 3), np.int32))
  proc = _run("vlbpe_jax.bpe.learn", f"--codes={path}", "--merges=1", "--no_progress",
              f"--out={tmp_path / 'bpe.json'}", VLBPE_DISTRIBUTED="2")
  _assert_one_line_error(proc, "VLBPE_DISTRIBUTED='2'", "expected 1")
  assert not (tmp_path / "bpe.json").exists()


@pytest.fixture
def vocabulary(tmp_path):
  g = np.random.default_rng(1).integers(0, 16, (8, 6, 6)).astype(np.int32)
  VisualBPE.learn(g, base_vocab_size=16, num_merges=4, progress=False).save(
      str(tmp_path / "bpe.json"))
  np.save(str(tmp_path / "codes.npy"), g)
  return str(tmp_path / "bpe.json"), str(tmp_path / "codes.npy"), g


@pytest.mark.parametrize("kind", ["bpe_truncated", "bpe_float_id", "codes_big", "codes_float",
                                  "codes_missing"])
def test_bpe_encode(tmp_path, vocabulary, kind):
  bpe, codes, g = vocabulary
  bad = codes
  if kind == "bpe_truncated":
    _torn(str(tmp_path / "torn.json"), bpe)
    bpe = bad = str(tmp_path / "torn.json")
  elif kind == "bpe_float_id":
    d = json.load(open(bpe))
    d["merges"][1]["a"] = 3.7
    json.dump(d, open(bpe, "w"))
    bad = bpe
  elif kind == "codes_big":
    np.save(codes, g + 16)  # codes >= base_vocab_size
  elif kind == "codes_float":
    np.save(codes, g.astype(np.float64))
  else:
    os.remove(codes)
  proc = _run("vlbpe_jax.bpe.encode", f"--bpe={bpe}", f"--codes={codes}",
              f"--out={tmp_path / 'tokens.npz'}")
  _assert_one_line_error(proc, bad)


@pytest.mark.parametrize("kind", ["empty", "truncated", "digest", "float_tokens",
                                  "out_of_range"])
def test_bpe_decode(tmp_path, vocabulary, kind):
  bpe_path, _, g = vocabulary
  bpe = VisualBPE.load(bpe_path)
  enc = bpe.encode(g)
  tokens = str(tmp_path / "tokens.npz")
  np.savez(tokens, **enc)
  names = [tokens]
  if kind == "empty":
    open(tokens, "wb").close()
  elif kind == "truncated":
    _torn(str(tmp_path / "torn.npz"), tokens)
    tokens = str(tmp_path / "torn.npz")
    names = [tokens]
  elif kind == "digest":  # the stage's layout, encoded with another vocabulary file
    np.savez(tokens, bpe_digest=np.array("0123456789abcdef"), **enc)
    names = [tokens, bpe_path, "digest"]
  elif kind == "float_tokens":
    np.savez(tokens, **dict(enc, tokens=enc["tokens"].astype(np.float32)))
  else:
    np.savez(tokens, **dict(enc, tokens=np.where(enc["tokens"] >= 0, 99, -1)))
  proc = _run("vlbpe_jax.bpe.decode", f"--bpe={bpe_path}", f"--tokens={tokens}",
              f"--out={tmp_path / 'back.npy'}")
  _assert_one_line_error(proc, *names)
  assert not (tmp_path / "back.npy").exists()


def _image_dir(tmp_path, kind):
  """A data dir with one broken image (or listing); returns (dir, the name to report)."""
  data = tmp_path / "data"
  (data / "images").mkdir(parents=True)
  for i in range(2):
    Image.fromarray(np.full((32, 32, 3), 90 * i, np.uint8)).save(data / "images" / f"{i}.png")
  bad = data / "images" / "1.png"
  if kind == "truncated_png":
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.png")
    _torn(str(bad), str(tmp_path / "whole.png"))
  elif kind == "not_png":
    bad.write_bytes(b"\x00" * 50)
  elif kind == "rgba":
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(bad)
  elif kind == "bad_jsonl":
    (data / "scenes.jsonl").write_text('{"image": "images/0.png"}\n{"image": \n')
    bad = data / "scenes.jsonl"
  elif kind == "missing_dir":
    bad = tmp_path / "nowhere"
    return str(bad), str(bad)
  return str(data), str(bad)


@pytest.mark.parametrize("kind", ["truncated_png", "not_png", "rgba", "bad_jsonl",
                                  "missing_dir"])
def test_vq_encode(tmp_path, kind):
  data, bad = _image_dir(tmp_path, kind)
  proc = _run("vlbpe_jax.vq.encode", f"--workdir={tmp_path / 'run'}", f"--data={data}",
              f"--out={tmp_path / 'codes.npy'}")
  _assert_one_line_error(proc, bad)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "float", "flat",
                                  "negative"])
def test_vq_decode(tmp_path, kind):
  path = _codes(tmp_path, kind)
  proc = _run("vlbpe_jax.vq.decode", f"--workdir={tmp_path / 'run'}", f"--codes={path}",
              f"--outdir={tmp_path / 'out'}")
  _assert_one_line_error(proc, path)


def _scene_dir(tmp_path, kind):
  data = tmp_path / "scenes"
  shapes.write_split(str(data), "test", 2, seed=0, resolution=32)
  jsonl = data / "scenes.jsonl"
  recs = [json.loads(x) for x in jsonl.read_text().splitlines()]
  if kind == "empty":
    jsonl.write_text("")
    return data, [jsonl]
  if kind == "unknown_shape":
    recs[1]["objects"][0]["shape"] = "hexagon"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return data, [f"{jsonl}:2", "hexagon", "circle"]
  if kind == "unknown_color":
    recs[0]["objects"][0]["color"] = "mauve"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return data, [f"{jsonl}:1", "mauve", "red"]
  if kind == "truncated_png":
    img = data / recs[1]["image"]
    _torn(str(tmp_path / "torn.png"), str(img))
    os.replace(tmp_path / "torn.png", img)
    return data, [f"{jsonl}:2", img]
  if kind == "bad_json":
    jsonl.write_text(jsonl.read_text() + "{not json\n")
    return data, [f"{jsonl}:3"]
  return tmp_path / "nowhere", [tmp_path / "nowhere"]


@pytest.mark.parametrize("kind", ["empty", "unknown_shape", "unknown_color", "truncated_png",
                                  "bad_json", "missing_dir"])
def test_scene_checker(tmp_path, kind):
  data, names = _scene_dir(tmp_path, kind)
  proc = _run("vlbpe_jax.eval.scene_checker", f"--data={data}")
  _assert_one_line_error(proc, *names)
