"""`train.run_stages`: independent stages run at once, never before what they read (issue 16's
budget: `config.stage_workers`)."""

import threading
import time

import ml_collections
import pytest

from vlbpe_jax import train

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
  with pytest.raises(ValueError, match="stage vq broke"):
    train.run_stages(ALL, rec, workers=2)
  assert sorted(rec.order("end")) == ["clip", "data", "vq"]
  assert not {"bpe", "lm", "dit", "v2l"} & set(rec.order("start"))


@pytest.mark.parametrize("bad", [0, -1, "2", True, 1.5])
def test_stage_workers_must_be_a_positive_integer(bad):
  with pytest.raises(ValueError, match="stage_workers"):
    train.stage_workers(ml_collections.ConfigDict({"stage_workers": bad}))


def test_stage_workers_defaults_to_one():
  assert train.stage_workers(ml_collections.ConfigDict({})) == 1
