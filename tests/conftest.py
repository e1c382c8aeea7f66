"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere; one compilation cache.

The end-to-end tests compile the same tiny steps many times (the pipeline, its reruns, the LM
stage); a persistent compilation cache shared by the test processes of one session (a fresh
folder, removed at exit) compiles each once. Set VLBPE_TEST_JAX_CACHE to keep one across runs.
"""

import atexit
import os
import shutil
import tempfile

# The tests' arrays are tiny, so compiling dominates their time: LLVM at -O0 compiles faster
# (tests/test_lm_train.py: 94 -> 67 CPU seconds, cold cache) and runs slower, which tiny shapes
# do not feel. Subprocesses (tests/test_devices.py, test_multiprocess.py) inherit XLA_FLAGS.
# Benchmarks never pass through here.
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "VLBPE_TEST_JAX_CACHE" not in os.environ:  # the first process (pytest-xdist's controller)
  _cache = tempfile.mkdtemp(prefix="vlbpe_jax_test_cache_")
  os.environ["VLBPE_TEST_JAX_CACHE"] = _cache  # inherited by the worker processes
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_compilation_cache_dir", os.environ["VLBPE_TEST_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


# The longest tests (CI at 7ffe6f8: the tiny pipeline 391 s, claims 176 s, the LM stage 154 s;
# the notebooks ~240 s together; at d98d22a the two pipeline reruns with their base ~170 s),
# started first so that no worker ends alone on one of them.
LONGEST = ("test_main.py::test_tiny_pipeline", "test_pipeline_reruns.py",
           "test_notebooks.py::test_notebook_runs",
           "test_claims.py::test_claims_on", "test_lm_train_stage.py")


def pytest_collection_modifyitems(items):
  """The longest tests first, then the other `slow` end-to-end tests (in file order), the quick
  ones last. `launch/local.sh test` runs pytest-xdist with `--dist worksteal`: each worker gets
  half of this list and an idle one takes half of the other's queue, from its end, so the long
  runs start early and the workers finish together on short tests. (With the default
  `--dist load`, a worker keeps the tests once handed to it: at 0bb7e26 one worker held the
  end-to-end runs and ran 470 s alone after the other had finished.)"""

  def rank(item):
    for i, prefix in enumerate(LONGEST):
      if item.nodeid.startswith("tests/" + prefix):
        return i
    return len(LONGEST) + (item.get_closest_marker("slow") is None)

  items.sort(key=rank)  # stable: file order within a rank
