"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere; one compilation cache.

The end-to-end tests compile the same tiny steps many times (the pipeline, its reruns, the LM
stage); a persistent compilation cache shared by the test processes of one session (a fresh
folder, removed at exit) compiles each once. Set VLBPE_TEST_JAX_CACHE to keep one across runs.
"""

import atexit
import fcntl
import json
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
# XLA's CPU fusion emitters (MLIR, the default in jaxlib 0.10) compile a third slower than the
# older LLVM IR emitters at -O0: tests/test_lm_train.py + test_dit_train.py + test_clip_train.py
# 143-145 -> 93-98 CPU seconds (BENCHMARKS.md, "The test suite's XLA CPU emitters").
if "--xla_cpu_use_fusion_emitters" not in _flags:
  _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "VLBPE_TEST_JAX_CACHE" not in os.environ:  # the first process (pytest-xdist's controller)
  _cache = tempfile.mkdtemp(prefix="vlbpe_jax_test_cache_")
  os.environ["VLBPE_TEST_JAX_CACHE"] = _cache  # inherited by the worker processes
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_compilation_cache_dir", os.environ["VLBPE_TEST_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


# The longest tests (CI at 7ffe6f8: the tiny pipeline 391 s, claims 176 s, the LM stage 154 s;
# the notebooks ~240 s together; at d98d22a the two pipeline reruns with their base ~170 s; at
# dd18da2 the tiny pipeline on 6 and on 1 devices 183 s alone),
# started first so that no worker ends alone on one of them.
LONGEST = ("test_main.py::test_tiny_pipeline", "test_devices.py::test_tiny_pipeline",
           "test_pipeline_reruns.py",
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


@pytest.fixture(scope="session")
def built_once(tmp_path_factory):
  """`built_once(name, build)` -> (a folder of this worker's own, build's result).

  `build(folder)` runs once per test session, whichever pytest-xdist worker asks first (a
  module-scoped fixture is built again on every worker that runs one of the module's tests,
  and `--dist worksteal` splits modules): into a folder shared by the session's workers,
  under a file lock, its result (a dict of numbers or strings) kept beside it as JSON. Each
  worker gets a copy of that folder, so its tests may write into it.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # pytest-xdist: <session root>/popen-gwN per worker

  def get(name, build):
    shared, done = root / f"built_once_{name}", root / f"built_once_{name}.json"
    with open(root / f"built_once_{name}.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
      if not done.exists():
        shutil.rmtree(shared, ignore_errors=True)
        shared.mkdir()
        result = build(str(shared))
        done.write_text(json.dumps(
            result, default=lambda v: v.item() if isinstance(v, np.generic) else v))
    own = tmp_path_factory.mktemp(name)
    shutil.copytree(shared, own, dirs_exist_ok=True)
    return str(own), json.loads(done.read_text())

  return get
