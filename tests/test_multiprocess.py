"""Two processes x 4 CPU devices (jax.distributed on localhost) == one process x 8 devices.

The workers (tests/multiprocess_worker.py) run as subprocesses; the one-process references run
in this process (8 fake devices, conftest.py). Losses and parameter norms per step must agree,
non-array files are written once, and checkpoints restore across the two layouts.
"""

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import lm_train_helpers as helpers
import multiprocess_worker as worker
from test_devices import xla_flags
from vlbpe_jax import fileio
from vlbpe_jax import summary
from vlbpe_jax.data import stage as data_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300  # a bound for a hang, far above a loaded 2-core CI machine's times


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class Workers:
  """`multiprocess_worker.py workdir *jobs` running in `num_processes` processes (started at
  construction); `wait()` kills them all on a failure or after `timeout` seconds and returns
  their outputs."""

  def __init__(self, workdir, *jobs, num_processes=2, timeout=TIMEOUT_S):
    env = dict(os.environ, XLA_FLAGS=xla_flags(xla_force_host_platform_device_count=4),
               JAX_PLATFORMS="cpu", VLBPE_DISTRIBUTED="1", PYTHONUNBUFFERED="1",
               VLBPE_NUM_PROCESSES=str(num_processes),
               JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    os.makedirs(workdir, exist_ok=True)
    self.timeout, self.deadline = timeout, time.time() + timeout
    self.logs = [open(os.path.join(workdir, f"worker{i}.log"), "w+")
                 for i in range(num_processes)]
    self.procs = [subprocess.Popen([sys.executable, worker.__file__, workdir, *jobs],
                                   env=dict(env, VLBPE_PROCESS_ID=str(i)), stdout=log,
                                   stderr=subprocess.STDOUT, cwd=ROOT)
                  for i, log in enumerate(self.logs)]

  def __enter__(self):
    return self

  def __exit__(self, *exc):  # on the way out of a failed test: no process left behind
    self._kill_left()

  def _kill_left(self):
    left = [p for p in self.procs if p.poll() is None]
    for p in left:  # the worker's faulthandler writes every thread's stack to its log
      p.send_signal(signal.SIGUSR1)
    if left:
      time.sleep(3)
    for p in left:
      p.kill()
    for p in self.procs:
      p.wait(timeout=30)

  def wait(self):
    procs = self.procs
    try:
      while any(p.poll() is None for p in procs):
        if time.time() > self.deadline or any(p.returncode not in (None, 0) for p in procs):
          break
        time.sleep(0.2)
    finally:
      self._kill_left()
    outs = []
    for log in self.logs:
      log.seek(0)
      outs.append(log.read())
      log.close()
    if any(p.returncode != 0 for p in procs):
      tails = "\n".join(f"--- worker {i} (rc {p.returncode}):\n{o[-8000:]}"
                        for i, (p, o) in enumerate(zip(procs, outs)))
      raise AssertionError(f"workers failed or timed out after {self.timeout}s:\n{tails}")
    return outs


def run_workers(workdir, *jobs, num_processes=2, timeout=TIMEOUT_S):
  """Runs `multiprocess_worker.py workdir *jobs` in `num_processes` processes (`Workers`)."""
  return Workers(workdir, *jobs, num_processes=num_processes, timeout=timeout).wait()


def _metrics(run_dir, keys=("train/loss", "train/l2_params")):
  rows = [r for r in summary.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
          if "train/loss" in r]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), f"{run_dir}: steps {steps} written more than once"
  return {k: np.array([r[k] for r in rows]) for k in ("step",) + keys}


def _assert_same_run(a, b):
  np.testing.assert_array_equal(a["step"], b["step"])
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)


@pytest.mark.slow
def test_lm_two_processes_equal_one_and_checkpoints_cross_layouts(tmp_path):
  wd = str(tmp_path)
  helpers.tokenizer(wd)  # wd/t.model
  worker.run_lm(wd, "ref")  # 1 process x 8 devices, steps 1-4
  worker.run_lm(wd, "one_then_two", stop_at_step=2)
  # 2 processes: a run to step 2, and the 1-process run of steps 1-2 resumed to step 4.
  run_workers(wd, "lm:two_then_one:2", "lm:one_then_two:0")
  for name in ("two_then_one", "one_then_two"):  # written once: process 0's files only
    assert not [f for f in os.listdir(os.path.join(wd, name)) if "tmp" in f]
  it_dir = os.path.join(wd, "two_then_one", "ckpt", "2", "data_iter")
  assert sorted(f for f in os.listdir(it_dir) if f.endswith(".json")) == [
      "shard_0-of-2.json", "shard_1-of-2.json"]
  worker.run_lm(wd, "two_then_one")  # the 2-process checkpoint resumed in 1 process
  ref = _metrics(os.path.join(wd, "ref"))
  assert list(ref["step"]) == [1, 2, 3, 4]
  _assert_same_run(_metrics(os.path.join(wd, "two_then_one")), ref)
  _assert_same_run(_metrics(os.path.join(wd, "one_then_two")), ref)


@pytest.mark.slow
def test_vq_two_processes_equal_one_and_checkpoints_cross_layouts_beside_a_late_pair(tmp_path):
  # Beside this test, in a pair of processes of its own: gloo waits 30 s for the other
  # processes' addresses at a device group's first collective, so a "bare" job whose process 1
  # arrives 35 s late fails with "Gloo context initialization failed: DEADLINE_EXCEEDED" (as
  # the LM test did in CI when one process compiled its step 30 s later); `parallel.Together`
  # compiles, then waits at the coordination service's barrier, then runs. (Its processes
  # mostly wait, so it runs here rather than alone, where its 35 s would hold a test worker.)
  with Workers(str(tmp_path / "late"), "late:together:35") as late:
    wd = str(tmp_path / "vq")
    os.makedirs(wd)
    worker.run_vq(wd, "one")  # 1 process x 8 devices: 3 steps, evaluation at step 3
    # 2 processes: the same 3 steps, then the 1-process checkpoint restored (nothing to train).
    run_workers(wd, "vq:two:0", "vq:one:0", timeout=600)
    assert os.listdir(os.path.join(wd, "two", "vq", "samples")) == ["step_000003.png"]
    one_restored = fileio.read_json(os.path.join(wd, "one", "result.json"))
    worker.run_vq(wd, "two")  # the 2-process checkpoint restored in 1 process
    two_restored = fileio.read_json(os.path.join(wd, "two", "result.json"))
    one, two = (_metrics(os.path.join(wd, n, "vq"), ("train/loss", "train/l2_grads"))
                for n in ("one", "two"))
    _assert_same_run(one, two)
    for k in ("psnr_db", "ssim", "perplexity"):
      np.testing.assert_allclose(one_restored[k], two_restored[k], rtol=1e-4, err_msg=k)
    late.wait()  # a late process of the pair still joins (both exit 0)


@pytest.mark.slow
def test_clip_two_processes_equal_one_and_checkpoints_cross_layouts(tmp_path):
  wd = str(tmp_path)
  names = ("ref", "two_then_one", "one_then_two")
  data_stage.run_stage(worker.clip_config(), os.path.join(wd, "src"))  # the same files for all
  for name, part in itertools.product(names, ("data", "tokenizer")):
    shutil.copytree(os.path.join(wd, "src", part), os.path.join(wd, name, part))
  worker.run_clip(wd, "ref")  # 1 process x 8 devices, steps 1-3
  worker.run_clip(wd, "one_then_two", stop_at_step=2)
  run_workers(wd, "clip:two_then_one:2", "clip:one_then_two:0", timeout=300)
  it_dir = os.path.join(wd, "two_then_one", "clip", "ckpt", "2", "data_iter")
  assert sorted(f for f in os.listdir(it_dir) if f.endswith(".json")) == [
      "shard_0-of-2.json", "shard_1-of-2.json"]
  worker.run_clip(wd, "two_then_one")  # the 2-process checkpoint resumed in 1 process
  ref = _metrics(os.path.join(wd, "ref", "clip"))
  assert list(ref["step"]) == [1, 2, 3]
  for name in names[1:]:
    assert not [f for f in os.listdir(os.path.join(wd, name, "clip")) if "tmp" in f]
    _assert_same_run(_metrics(os.path.join(wd, name, "clip")), ref)


def _check_cross_layouts(wd, kind, run, sub="", written=(), timeout=300):
  """A 3-step run of the worker job `kind` (`run(workdir, name, stop_at_step)`) into
  wd/NAME/sub: the 1-process x 8-device reference; in 2 processes a fresh run to step 2 and
  the 1-process run of steps 1-2 resumed to step 3; then the 2-process checkpoint resumed in
  1 process. Losses and parameter norms per step equal the reference's, the data iterator is
  saved per shard, and the files are written once (`written` among them, no temp files)."""
  run_dir = lambda name: os.path.join(wd, name, sub)  # noqa: E731
  run(wd, "ref")  # 1 process x 8 devices, steps 1-3
  run(wd, "one_then_two", stop_at_step=2)
  # 2 processes: a run to step 2, and the 1-process run of steps 1-2 resumed to step 3.
  run_workers(wd, f"{kind}:two_then_one:2", f"{kind}:one_then_two:0", timeout=timeout)
  for name in ("two_then_one", "one_then_two"):  # written once: process 0's files only
    files = os.listdir(run_dir(name))
    assert set(written) <= set(files) and not [f for f in files if "tmp" in f], files
  it_dir = os.path.join(run_dir("two_then_one"), "ckpt", "2", "data_iter")
  assert sorted(f for f in os.listdir(it_dir) if f.endswith(".json")) == [
      "shard_0-of-2.json", "shard_1-of-2.json"]
  run(wd, "two_then_one")  # the 2-process checkpoint resumed in 1 process
  ref = _metrics(run_dir("ref"))
  assert list(ref["step"]) == [1, 2, 3]
  _assert_same_run(_metrics(run_dir("two_then_one")), ref)
  _assert_same_run(_metrics(run_dir("one_then_two")), ref)


@pytest.mark.slow
def test_dit_two_processes_equal_one_and_checkpoints_cross_layouts(tmp_path):
  _check_cross_layouts(str(tmp_path), "dit", worker.run_dit, written=("target_stats.json",))


@pytest.mark.slow
def test_dit_decoder_two_processes_equal_one_and_checkpoints_cross_layouts(tmp_path):
  _check_cross_layouts(str(tmp_path), "decoder", worker.run_decoder,
                       "pixel_decoder", written=("feature_stats.json",))


@pytest.mark.slow
def test_v2l_two_processes_equal_one_and_checkpoints_cross_layouts(tmp_path):
  _check_cross_layouts(str(tmp_path), "v2l", worker.run_v2l)


@pytest.mark.slow
def test_pipeline_data_stage_written_by_process_zero(tmp_path):
  """Two processes run the `data` stage on one workdir: process 0 builds the dataset and the
  tokenizer, process 1 waits, then both see the stage done; a rerun skips it."""
  wd = str(tmp_path)
  run_workers(wd, "data:run:0", "data:run:0")
  m = fileio.read_json(os.path.join(wd, "run", "manifests", "data.json"))
  assert m["status"] == "done"


@pytest.mark.slow
def test_bpe_two_processes_learn_the_vocabulary_of_one(tmp_path):
  """The BPE stage and the learn CLI in 2 processes, each counting its half of the grids with
  the counts summed over processes: bpe.json is byte-identical to one process's; the stage's
  rerun reuses it on process 0's word, and only process 0 writes."""
  wd = str(tmp_path)
  codes = worker.bpe_codes()
  np.save(os.path.join(wd, "codes.npy"), codes)
  for name in ("one", "two"):
    os.makedirs(os.path.join(wd, name, "vq"))
    np.save(os.path.join(wd, name, "vq", "codes_train.npy"), codes)
  worker.run_bpe(wd, "one")
  worker.run_bpe_cli(wd, "cli_one")
  run_workers(wd, "bpe:two:0", "bpecli:cli_two:0")
  read = lambda *p: open(os.path.join(wd, *p), "rb").read()
  assert read("two", "bpe", "bpe.json") == read("one", "bpe", "bpe.json")
  assert read("cli_two.json") == read("cli_one.json")
  bpe = fileio.read_json(os.path.join(wd, "two", "bpe", "bpe.json"))
  assert len(bpe["merges"]) == 60 and sum(m["merged"] for m in bpe["merges"]) > 60
  stats = os.path.join(wd, "two", "bpe", "stats.json")
  before = os.stat(stats).st_mtime_ns
  assert not [f for f in os.listdir(os.path.join(wd, "two", "bpe")) if "tmp" in f]
  run_workers(wd, "bpe:two:0")  # reused on process 0's word: nothing learned again
  assert os.stat(stats).st_mtime_ns == before
  assert read("two", "bpe", "bpe.json") == read("one", "bpe", "bpe.json")
