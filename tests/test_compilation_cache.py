"""The CLIs' persistent compilation cache (`--jax_cache_dir`, vlbpe_jax/cli.py)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from vlbpe_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cache_folder_rule():
  rule = cli.compilation_cache_dir
  assert rule("auto", "/w", None) == os.path.join("/w", "jax_cache")
  assert rule("auto", None, None) is None  # no workdir, no cache
  assert rule("auto", "/w", "/mine") == "/mine"  # JAX_COMPILATION_CACHE_DIR wins over auto
  assert rule("", "/w", "/mine") is None  # off
  assert rule("/c", "/w", "/mine") == "/c"


def _train_vq(workdir):
  """The tiny VQ trainer's logged metrics (timings left out) and the programs it loaded from
  the cache."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["JAX_LOG_COMPILES"] = "1"  # cache hits are logged too
  res = subprocess.run(
      [sys.executable, "-m", "vlbpe_jax.vq.train", "--config=configs/tiny.py:tiny",
       f"--workdir={workdir}",
       # the demo's VQ without its GAN compiles in about half the time of the tests' own
       "--config.vq.variant=tiny_p4_patch", "--config.vq.disc_weight=0"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  with open(os.path.join(workdir, "vq", "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  metrics = [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in lines]
  return metrics, re.findall(r"Persistent compilation cache hit for '([^']+)'", res.stderr)


@pytest.mark.slow
def test_a_rerun_loads_its_programs_from_the_workdirs_cache(tmp_path):
  w = str(tmp_path / "w")
  first, hits = _train_vq(w)
  assert not hits
  written = os.listdir(os.path.join(w, "jax_cache"))
  assert any(name.startswith("jit_train_step-") for name in written), written
  # The run again from scratch (as after a kill before its first checkpoint): its step is
  # loaded, not compiled, and it logs the same values to the last digit.
  shutil.rmtree(os.path.join(w, "vq"))
  again, hits = _train_vq(w)
  assert "jit_train_step" in hits, hits
  assert again == first and len(first) >= 2
