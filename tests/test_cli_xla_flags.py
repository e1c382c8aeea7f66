"""A config's XLA optimisation level reaches XLA_FLAGS before jax starts (vlbpe_jax/cli.py)."""

import os
import subprocess
import sys

import ml_collections
import pytest

from vlbpe_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVEL = cli.OPT_LEVEL_FLAG


@pytest.mark.parametrize("level,xla_flags,expected", [
    (None, "", ""),  # XLA's default
    (1, "", f"{LEVEL}=1"),
    (0, "--xla_force_host_platform_device_count=8",
     f"--xla_force_host_platform_device_count=8 {LEVEL}=0"),
    (1, f"{LEVEL}=2 --xla_cpu_multi_thread_eigen=false",  # the user's level wins
     f"{LEVEL}=2 --xla_cpu_multi_thread_eigen=false"),
])
def test_the_config_level_is_added_unless_xla_flags_names_one(level, xla_flags, expected):
  config = ml_collections.ConfigDict({"xla_backend_optimization_level": level})
  assert cli.xla_flags_for_config(config, xla_flags) == expected
  assert cli.xla_flags_for_config(ml_collections.ConfigDict(), xla_flags) == xla_flags
  assert cli.xla_flags_for_config(None, xla_flags) == xla_flags  # a CLI without --config


@pytest.mark.parametrize("bad", [4, -1, True, "1", 1.0])
def test_a_bad_level_is_named(bad):
  config = ml_collections.ConfigDict({"xla_backend_optimization_level": bad})
  with pytest.raises(ValueError, match=r"xla_backend_optimization_level=.*integer 0-3"):
    cli.xla_flags_for_config(config, "")


SCRIPT = """
import os
from ml_collections import config_flags
from vlbpe_jax import cli
config_flags.DEFINE_config_file("config", None, "a config")

def main(argv):
  import jax
  jax.devices()  # the backend starts here, after cli.run set XLA_FLAGS
  print("XLA_FLAGS=" + os.environ["XLA_FLAGS"])

cli.run(main)
"""


@pytest.mark.parametrize("xla_flags,expected", [
    ("--xla_force_host_platform_device_count=2",
     f"--xla_force_host_platform_device_count=2 {LEVEL}=1"),  # the demo config's level
    (f"{LEVEL}=0", f"{LEVEL}=0"),  # as the tests' own XLA_FLAGS (conftest.py) keep -O0
])
def test_every_absl_cli_sets_the_demo_config_level_before_jax_starts(tmp_path, xla_flags,
                                                                     expected):
  script = tmp_path / "cli_main.py"
  script.write_text(SCRIPT)
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  done = subprocess.run([sys.executable, str(script), f"--config={ROOT}/configs/tiny.py"],
                        env=env, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"XLA_FLAGS={expected}\n" in done.stdout
