"""`train.run_stages`: independent stages run at once, never before what they read (issue 16's
budget: `config.stage_workers`)."""

import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from vlbpe_jax import parallel
from vlbpe_jax import train
from test_main import ROOT, load_config
from test_pipeline_reruns import _results as metrics_but_times

ALL = list(train.STAGES)


class Recorder:
  """A fake stage runner: logs (event, stage, time) and the most stages seen running at once."""

  def __init__(self, waits=None, fail=()):
    self.lock = threading.Lock()
    self.events, self.running, self.most = [], 0, 0
    self.started = {n: threading.Event() for n in ALL}
    self.waits = waits or {}  # stage -> stage that must have started before it returns
    self.fail = set(fail)

  def __call__(self, name):
    with self.lock:
      self.events.append(("start", name, time.monotonic()))
      self.running += 1
      self.most = max(self.most, self.running)
    self.started[name].set()
    try:
      if name in self.waits:  # proves overlap: with one worker this would time out
        assert self.started[self.waits[name]].wait(timeout=20), (name, self.waits[name])
      time.sleep(0.01)
      if name in self.fail:
        raise ValueError(f"stage {name} broke")
    finally:
      with self.lock:
        self.events.append(("end", name, time.monotonic()))
        self.running -= 1

  def order(self, kind):
    return [n for e, n, _ in self.events if e == kind]

  def time(self, kind, name):
    return next(t for e, n, t in self.events if e == kind and n == name)


def test_independent_stages_overlap_and_never_start_before_their_inputs():
  rec = Recorder(waits={"vq": "clip", "clip": "vq", "dit": "v2l", "v2l": "dit"})
  train.run_stages(ALL, rec, workers=2)
  assert sorted(rec.order("end")) == sorted(ALL)
  assert rec.most == 2
  for name in ALL:
    for up in train.STAGES[name].reads:
      assert rec.time("end", up) <= rec.time("start", name), (up, name)


def test_one_worker_runs_the_pipeline_order_one_at_a_time():
  rec = Recorder()
  train.run_stages(ALL, rec, workers=1)
  assert rec.order("start") == ALL and rec.most == 1


def test_a_stage_not_selected_is_not_waited_for():
  rec = Recorder(waits={"dit": "v2l", "v2l": "dit"})
  train.run_stages(["dit", "v2l"], rec, workers=2)
  assert sorted(rec.order("end")) == ["dit", "v2l"]


def test_a_failed_stage_lets_the_running_one_finish_and_starts_nothing_after_it():
  rec = Recorder(waits={"vq": "clip", "clip": "vq"}, fail=("vq",))
  # Without pixel_decoder, text_icl and v2l, which read neither vq nor what follows it (they may
  # start before vq fails).
  with pytest.raises(ValueError, match="stage vq broke"):
    train.run_stages([n for n in ALL if n not in ("pixel_decoder", "text_icl", "v2l")], rec,
                     workers=2)
  assert sorted(rec.order("end")) == ["clip", "data", "text", "vq"]
  assert not {"bpe", "lm", "dit"} & set(rec.order("start"))


@pytest.mark.parametrize("bad", [0, -1, "2", True, 1.5])
def test_stage_workers_must_be_a_positive_integer(bad):
  with pytest.raises(ValueError, match="stage_workers"):
    parallel.stage_workers(ml_collections.ConfigDict({"stage_workers": bad}))


def test_stage_workers_defaults_to_one():
  assert parallel.stage_workers(ml_collections.ConfigDict({})) == 1


@pytest.mark.parametrize("workers,flags,expected", [
    (1, "", ""),  # one piece of work at a time: Eigen's threads as they are
    (2, "", parallel.SIDE_BY_SIDE_XLA_FLAG),
    (2, "--xla_force_host_platform_device_count=8",
     "--xla_force_host_platform_device_count=8 " + parallel.SIDE_BY_SIDE_XLA_FLAG),
    (3, "--xla_cpu_multi_thread_eigen=true", "--xla_cpu_multi_thread_eigen=true"),  # the user's
])
def test_side_by_side_work_runs_eigen_ops_on_one_thread(workers, flags, expected, monkeypatch):
  config = ml_collections.ConfigDict({"stage_workers": workers})
  monkeypatch.delenv("VLBPE_DISTRIBUTED", raising=False)
  assert parallel.side_by_side_xla_flags(config, flags) == expected
  monkeypatch.setenv("VLBPE_DISTRIBUTED", "1")  # several processes: one stage at a time
  assert parallel.side_by_side_xla_flags(config, flags) == flags
  with pytest.raises(ValueError, match="stage_workers"):
    parallel.side_by_side_xla_flags(ml_collections.ConfigDict({"stage_workers": 0}), flags)


def test_the_pipeline_cli_sets_the_flag_before_jax_starts(tmp_path, monkeypatch):
  """`vlbpe_jax.main` puts the flag in XLA_FLAGS before its first jax use (the backend reads
  it once, at start): the demo config (stage_workers 2) gets it."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vlbpe_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  seen = {}

  def fake_initialize():
    seen["flags"] = os.environ["XLA_FLAGS"]
    return False

  def fake_run(config, workdir):
    seen["workers"] = config.stage_workers
    return os.path.join(workdir, "index.html")

  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  monkeypatch.delenv("VLBPE_DISTRIBUTED", raising=False)
  monkeypatch.setattr(main_lib.parallel, "initialize_distributed", fake_initialize)
  monkeypatch.setattr(main_lib.train, "train_and_evaluate", fake_run)
  flags.FLAGS.unparse_flags()
  flags.FLAGS([sys.argv[0], f"--config={ROOT}/configs/tiny.py", f"--workdir={tmp_path}"])
  try:
    main_lib.main([sys.argv[0]])
  finally:
    flags.FLAGS.unparse_flags()
  assert seen == {"workers": 2, "flags": "--xla_force_host_platform_device_count=8 "
                                         + parallel.SIDE_BY_SIDE_XLA_FLAG}


@pytest.mark.slow
def test_stages_on_threads_give_what_they_give_one_at_a_time(tmp_path):
  # The tiny data and vq stages (vq renders its own scenes: it runs beside data), on threads
  # and one at a time: the same metrics, codes and report.
  out = {}
  for workers in (2, 1):
    config = load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")
    config.stages, config.stage_workers = "data,vq", workers
    w = tmp_path / f"w{workers}"
    train.train_and_evaluate(config, str(w))
    out[workers] = (metrics_but_times(str(w)),
                    {p.name: np.load(p) for p in sorted((w / "vq").glob("codes_*.npy"))})
  assert out[2][0] == out[1][0] and "vq.psnr_db" in out[1][0]
  assert out[2][1].keys() == out[1][1].keys() and out[1][1]
  for name, codes in out[1][1].items():
    np.testing.assert_array_equal(out[2][1][name], codes)


@pytest.mark.parametrize("to", ["process", "stage_thread", "gc_callback"])
def test_ctrl_c_ends_the_run_at_once_though_stages_run_on_threads(tmp_path, to):
  # Without it the interpreter would wait for the stage threads to finish their work. The
  # kernel may hand the signal to any thread ("stage_thread": to a stage's own, which the
  # waiting main thread must still notice). "gc_callback": the signal is handled while the main
  # thread runs a gc callback (jax registers one), where Python drops a KeyboardInterrupt (a
  # plain SIGINT landed there in 2-3 of 5 runs on the development host, and failed a CI run).
  script = tmp_path / "run.py"
  script.write_text(
      "import gc, signal, sys, threading, time\n"
      "signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started ignored\n"
      "from vlbpe_jax import train\n"
      "started = threading.Semaphore(0)\n"
      "def in_gc(phase, info):\n"
      "  if threading.current_thread() is threading.main_thread() and started.acquire(False):\n"
      "    signal.raise_signal(signal.SIGINT)  # its handler runs here, inside the callback\n"
      f"if {to == 'gc_callback'}:\n"
      "  gc.callbacks.append(in_gc)\n"
      "  gc.set_threshold(1)  # the waiting main thread collects at once\n"
      "def run(name):\n"
      "  sys.stdout.write(f'started {name}\\n')  # one write: the two threads' lines stay whole\n"
      "  sys.stdout.flush()\n"
      "  if name == 'clip':\n"
      "    started.release()\n"
      f"  if name == 'clip' and {to == 'stage_thread'}:\n"
      "    time.sleep(0.5)\n"
      "    signal.pthread_kill(threading.get_ident(), signal.SIGINT)\n"
      "  time.sleep(120)\n"
      "train.run_stages(['vq', 'clip'], run, workers=2)\n")
  proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    started = {proc.stdout.readline().strip() for _ in range(2)}
    assert started == {"started vq", "started clip"}, started
    if to == "process":
      proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130
    # clip may have started before the main thread took it in
    assert "interrupted while vq" in proc.communicate()[1]
  finally:
    proc.kill()
    proc.communicate()  # closes the pipes


@pytest.mark.parametrize("backend,devices,want", [("gpu", 8, 1), ("tpu", 4, 1), ("gpu", 1, 2),
                                                  ("cpu", 8, 2)])
def test_several_accelerators_run_one_stage_at_a_time(monkeypatch, backend, devices, want):
  monkeypatch.setattr(parallel.jax, "default_backend", lambda: backend)
  monkeypatch.setattr(parallel.jax, "device_count", lambda: devices)
  assert parallel.stage_workers(ml_collections.ConfigDict({"stage_workers": 2})) == want


def test_programs_with_collectives_on_two_threads_do_not_stall():
  # What stages side by side rely on for the CPU devices: two programs with collectives over
  # every device, dispatched from two threads over and over, never wait on each other.
  mesh = Mesh(np.array(jax.devices()), ("d",))
  x0 = jax.device_put(np.arange(jax.device_count() * 64, dtype=np.float32),
                      NamedSharding(mesh, P("d")))

  def make(k):
    def f(x):
      for _ in range(k):
        x = jnp.roll(x + x.sum() * 1e-6, 1)  # an all-reduce and a collective permute
      return x
    return jax.jit(f)

  counts = [0, 0]

  def work(i, fn):
    x, end = x0, time.monotonic() + 3
    while time.monotonic() < end:
      x = fn(x).block_until_ready()
      counts[i] += 1

  threads = [threading.Thread(target=work, args=(i, make(k)), daemon=True)
             for i, k in enumerate((3, 5))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert not any(t.is_alive() for t in threads) and min(counts) > 10, counts
