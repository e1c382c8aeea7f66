"""The shipped configs run on any device count (issue 15): the tiny pipeline on 1, 6 and 8 devices.

The test process has 8 fake devices (conftest), so other counts run in a subprocess. On 6
devices every training stage's batch (8 or 16 rows) splits 2 ways and 3 devices replicate each
shard (vlbpe_jax/parallel.py:plan_mesh). The tiny pipeline on 8 devices is test_main.py's run;
1, 6 and 8 devices step alike at the trainer level (test_parallel.py, test_vq_train.py).
"""

import os
import re
import subprocess
import sys

import pytest

from vlbpe_jax.eval import report
import test_main

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


# A device count may move continuous metrics by float reduction order only (2026-12-07, 1 and 6
# vs 8 devices in the suite: 17 and 20 of 143 moved, at most 1.2e-4 apart, the DiT's diversity;
# V2L restoration's PSNR gains, differences of two PSNRs of nearly equal images, by up to 1.4%
# of a 0.0027-dB gain); accuracies and counts not at all.
def _assert_same_metrics(a, b, what):
  skip = lambda k: k.startswith(("time_s.", "perf.")) or "seconds" in k  # noqa: E731
  a = {k: v for k, v in a.items() if not skip(k)}
  b = {k: v for k, v in b.items() if not skip(k)}
  assert sorted(a) == sorted(b), what
  for k in a:
    if isinstance(a[k], (int, float)) and isinstance(b[k], (int, float)):
      assert abs(a[k] - b[k]) <= 1e-3 + 1e-4 * abs(b[k]), f"{k} ({what}): {a[k]} vs {b[k]}"
    else:
      assert a[k] == b[k], f"{k} ({what})"


@pytest.mark.slow
def test_tiny_pipeline_on_6_and_1_devices_gives_the_metrics_of_8(built_once, tmp_path):
  # Every stage end to end (the demo stopped in the VQ stage on 8 devices), one LM run for CI
  # time; results must not depend on the device count beyond float reduction order. The run on
  # 8 devices is test_main.py's (built once per session; asked for last, so that this test
  # does not wait on it while the other worker builds it).
  metrics, logs = {}, {}
  for n in (6, 1):
    logs[n] = run_main(n, tmp_path / str(n), "--config=configs/tiny.py:tiny",
                       "--config.lm.runs=('full',)")
    metrics[n] = report.read_metrics(str(tmp_path / str(n)))
  for batch in ("8", "16"):  # vq, lm, dit, v2l; clip
    assert (f"mesh data=2 fsdp=1 tensor=1 replica=3 (batch {batch} over 6 devices: 2 batch "
            "shards, 3 replicas of each)") in logs[6], batch
  for key in ("vq.psnr_db", "clip.zero_shot_shape_acc", "lm.vqa_acc.full", "dit.geneval.fm",
              "v2l.fewshot_acc.2way_1shot", "v2l.restore_psnr_gain_db.inpaint"):
    assert key in metrics[6], key
  metrics[8] = report.read_metrics(test_main.tiny_pipeline(built_once)[0])
  for n in (6, 1):
    _assert_same_metrics(metrics[n], metrics[8], f"{n} vs 8 devices")
