"""The shipped configs run on any device count (issue 15): tiny stages on 6 fake devices.

The test process has 8 fake devices (conftest), so other counts run in a subprocess. On 6
devices every training stage's batch (8 or 16 rows) splits 2 ways and 3 devices replicate each
shard (vlbpe_jax/parallel.py:plan_mesh). The whole tiny pipeline on 8 devices is test_main.py's;
1, 6 and 8 devices step alike at the trainer level (test_parallel.py, test_vq_train.py).
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(**flags) -> str:
  """This process's XLA_FLAGS (conftest.py's) with `--NAME=VALUE` for each of `flags`, a value
  already there replaced: the flags of a subprocess that a test starts."""
  out = os.environ.get("XLA_FLAGS", "")
  for name, value in flags.items():
    out = re.sub(rf"--{name}=\S*", "", out) + f" --{name}={value}"
  return " ".join(out.split())


def run_main(num_devices: int, workdir, *args: str) -> str:
  """`python -m vlbpe_jax.main` on `num_devices` fake CPU devices; returns its log."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=xla_flags(xla_force_host_platform_device_count=num_devices))
  proc = subprocess.run([sys.executable, "-m", "vlbpe_jax.main", f"--workdir={workdir}", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc.stderr


@pytest.mark.slow
def test_tiny_vq_and_clip_stages_run_on_6_devices(tmp_path):
  # The VQ stage (the demo stopped there on 8 devices) and a `sharded_trainer` stage (CLIP; the
  # DiT, its decoder and V2L train the same way), with their evaluation helpers. The other
  # stages cost minutes here; on 6 devices they ran by hand (see the branch's report).
  log = run_main(6, tmp_path, "--config=configs/tiny.py:tiny", "--config.stages=data,vq,clip")
  for batch in ("8", "16"):  # vq; clip
    assert (f"mesh data=2 fsdp=1 tensor=1 replica=3 (batch {batch} over 6 devices: 2 batch "
            "shards, 3 replicas of each)") in log, batch
  with open(tmp_path / "report" / "metrics.json") as f:
    metrics = json.load(f)
  for key in ("vq.psnr_db", "vq.codebook_usage", "clip.zero_shot_shape_acc"):
    assert key in metrics, key
