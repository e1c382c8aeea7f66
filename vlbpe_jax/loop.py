"""The training loop every trainer shares: resume, steps, metrics, checkpoints, a NaN stop.

  with checkpoint.Checkpointer(ckpt_dir, config=config, must_match=MUST_MATCH) as ckpt:
    it = iter(grain_dataset)
    state, start, seconds = loop.restore_or_init(ckpt, abstract_state, init_fn, it)
    with summary.MetricWriter(logdir, resume_step=start) as writer:
      state = loop.fit(state, step_fn, it, total_steps=N, ckpt=ckpt, writer=writer,
                       log_every=20, ckpt_every=1000, name="vq", seconds_before=seconds)

`run` is that whole block for a run directory (`run_dir/ckpt`, metrics in `run_dir`):

  state = loop.run(run_dir, abstract_state, init_fn, step_fn, it, config=config,
                   must_match=MUST_MATCH, total_steps=N, log_every=20, ckpt_every=1000,
                   name="clip")

`fit` runs `step_fn(state, batch) -> (state, metrics)`, the caller's jitted step (which shards
the host batch itself), from `state["step"]` to `total_steps` under
`jax.transfer_guard("disallow")`. A step's metrics (a dict of scalars) are fetched while the
next step runs, so the host never stalls dispatch; a non-finite value at a `check_keys` key
raises FloatingPointError naming the step and the last good checkpoint. At every `log_every`-th
step and the last, the writer gets `{"train/<k>": v, ..., "perf/step_time_s": s}` (+ the
caller's items per second). A checkpoint (state + data-iterator position + `{"train_seconds":
t}`, t summed over every process that trained the run) is written every `ckpt_every` steps, at
the last step, at `stop_at_step` and at `ckpt_at` steps, always after that step's metrics
passed the check, so the latest checkpoint is a good one.
"""

import math
import os
import time
from typing import Any, Callable, Collection, Mapping

from absl import logging
import jax
import numpy as np
import tqdm

from vlbpe_jax import checkpoint
from vlbpe_jax import summary


def restore_or_init(ckpt: checkpoint.Checkpointer, abstract_state, init_fn: Callable[[], Any],
                    data_iter=None):
  """The latest checkpoint's state, or `init_fn()` when `ckpt` holds none.

  abstract_state: the state's pytree of `jax.ShapeDtypeStruct` with shardings
    (`checkpoint.abstract_like`); data_iter: a grain iterator whose position is restored in
    place. Returns `(state, start_step, seconds_before)`: `start_step` is `state["step"]`, and
    `seconds_before` the seconds the run trained before (saved with the checkpoint, 0 when
    fresh) plus those this call took (restore or init, compilation included), for `fit`.
  """
  t0 = time.time()
  latest = ckpt.latest_step()
  if latest is None:
    state, before = init_fn(), 0.0
  else:
    state = ckpt.restore(abstract_state, data_iter=data_iter)
    before = float(ckpt.meta().get("train_seconds", 0.0))
    logging.info("Resumed from step %d in %s", latest, ckpt.directory)
  start = int(jax.device_get(state["step"]))
  return state, start, before + time.time() - t0


def run(run_dir: str, abstract_state, init_fn: Callable[[], Any], step_fn, data_iter, *,
        config, must_match: tuple[str, ...], max_to_keep: int = 2, **fit_kwargs):
  """A run in `run_dir`: resumes from `run_dir/ckpt` (a checkpoint written with another config
  at a `must_match` key is refused) or starts from `init_fn()`, then `fit`s with a
  `summary.MetricWriter` on `run_dir`. `fit_kwargs`: `fit`'s keywords other than `ckpt`,
  `writer` and `seconds_before`. Returns the final state."""
  with checkpoint.Checkpointer(os.path.join(run_dir, "ckpt"), max_to_keep=max_to_keep,
                               config=config, must_match=must_match) as ckpt:
    state, start, seconds = restore_or_init(ckpt, abstract_state, init_fn, data_iter)
    with summary.MetricWriter(run_dir, resume_step=start) as writer:
      return fit(state, step_fn, data_iter, ckpt=ckpt, writer=writer, seconds_before=seconds,
                 **fit_kwargs)


def train_seconds(ckpt_dir: str) -> float:
  """Seconds spent training up to the latest checkpoint in `ckpt_dir`, summed over every
  process that resumed the run (`fit` saves them with each checkpoint); NaN when it has none."""
  with checkpoint.Checkpointer(ckpt_dir) as ckpt:
    return float(ckpt.meta().get("train_seconds", math.nan))


class _StepLog:
  """Checks each step's metrics one step late and writes every `log_every`-th step's."""

  def __init__(self, name, writer, ckpt, bar, *, step, total_steps, log_every, check_keys,
               items_per_step, extra_scalars):
    self.name, self.writer, self.ckpt, self.bar = name, writer, ckpt, bar
    self.total_steps, self.log_every, self.check_keys = total_steps, log_every, check_keys
    self.items_per_step, self.extra_scalars = items_per_step, extra_scalars
    self.pending = None
    self.clock = (time.time(), step)  # (time, step) of the last written line

  def push(self, step: int, metrics):
    """Records `step`'s (device) metrics after checking the previous step's."""
    self.flush()
    self.pending = (step, metrics)

  def flush(self):
    """Fetches the pending step's metrics, stops on a non-finite value, writes them when due."""
    if self.pending is None:
      return
    (step, m), self.pending = jax.device_get(self.pending), None
    extra = self.extra_scalars(step) if self.extra_scalars else {}
    missing = [k for k in self.check_keys if k not in m]
    if missing:
      raise ValueError(f"check_keys={self.check_keys}: {missing} not in the step's metrics "
                       f"{sorted(m)}")
    bad = {k: m[k] for k in self.check_keys if not np.all(np.isfinite(m[k]))}
    if bad:
      self.ckpt.wait()  # an async save in flight is the last good checkpoint
      where = "".join(f" ({k} {v:g})" for k, v in extra.items())
      raise FloatingPointError(
          f"{self.name}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step "
          f"{step}{where}; stopped. Last good checkpoint: step {self.ckpt.latest_step()} in "
          f"{self.ckpt.directory}")
    if step % self.log_every and step != self.total_steps:
      return
    now = time.time()
    dt = (now - self.clock[0]) / max(step - self.clock[1], 1)
    self.clock = (now, step)
    self.writer.write_scalars(step, {**extra, **{f"train/{k}": v for k, v in m.items()},
                                     "perf/step_time_s": dt,
                                     **{k: (n(step) if callable(n) else n) / dt
                                        for k, n in self.items_per_step.items()}})
    if "loss" in m:
      self.bar.set_postfix(loss=f"{float(m['loss']):.4g}", **extra)


def _check_positive(**values):
  for name, v in values.items():
    if int(v) < 1:
      raise ValueError(f"{name}={v!r}: expected a positive int")


def fit(state, step_fn, data_iter, *, total_steps: int, ckpt: checkpoint.Checkpointer, writer,
        log_every: int, ckpt_every: int, name: str, seconds_before: float = 0.0,
        items_per_step: Mapping[str, float | Callable[[int], float]] | None = None,
        check_keys=("loss",),
        progress: bool = True, stop_at_step: int | None = None, ckpt_at: Collection[int] = (),
        before_step=None, after_step=None, after_every: int = 1, extra_scalars=None):
  """Trains `state` from `state["step"]` to `total_steps`; returns the final state.

  state: a pytree with an int `"step"` (steps done), e.g. `{"step", "params", "opt"}`.
  step_fn: `(state, host batch) -> (state, metrics)`, metrics a dict of scalars.
  data_iter: a grain iterator of host batches (its position is saved with each checkpoint).
  writer: has `write_scalars(step, {name: float})` (`summary.MetricWriter`).
  seconds_before: the run's seconds before this call (`restore_or_init`'s third output).
  items_per_step: `{metric name: items one step processes}`, each logged as items / step
    time, e.g. `{"perf/images_per_s": batch_size}` (or `step -> items`, when it varies).
  check_keys: metrics that must be finite at every step.
  stop_at_step: stops after checkpointing that step, as a preemption would (tests).
  ckpt_at: more steps to checkpoint at (e.g. the LM's phase ends).
  before_step: `(step, state, data_iter) -> (state, data_iter)`, called before each step with
    the steps done so far (a phase switch: migrate the optimizer state, change the data).
  after_step: `(step, state)`, called after every `after_every`-th step and the last, once that
    step's metrics passed the check and were written (e.g. evaluation).
  extra_scalars: `step -> {name: float}`, written un-namespaced on the step's metrics line and
    named in a non-finite error (the LM's `{"stage": 2}`).
  The hooks run under the transfer guard: device work in them goes through `jax.jit` and
  explicit `jax.device_put` / `jax.device_get`.
  """
  _check_positive(log_every=log_every, ckpt_every=ckpt_every, after_every=after_every)
  if int(total_steps) < 0:
    raise ValueError(f"total_steps={total_steps!r}: expected an int >= 0")
  if stop_at_step is not None and int(stop_at_step) < 1:
    raise ValueError(f"stop_at_step={stop_at_step!r}: expected None or a positive int")
  t_start = time.time()
  step = int(jax.device_get(state["step"]))
  end = total_steps if stop_at_step is None else min(total_steps, stop_at_step)
  with tqdm.tqdm(total=total_steps, initial=step, desc=name, disable=not progress) as bar:
    log = _StepLog(name, writer, ckpt, bar, step=step, total_steps=total_steps,
                   log_every=log_every, check_keys=tuple(check_keys),
                   items_per_step=dict(items_per_step or {}), extra_scalars=extra_scalars)
    with jax.transfer_guard("disallow"):
      while step < end:
        if before_step is not None:
          state, data_iter = before_step(step, state, data_iter)
        state, metrics = step_fn(state, next(data_iter))
        step += 1
        log.push(step, metrics)  # checks the previous step's while this one runs
        bar.update(1)
        last = step == total_steps
        evaluate = after_step is not None and (step % after_every == 0 or last)
        save = step % ckpt_every == 0 or last or step == stop_at_step or step in ckpt_at
        if evaluate or save:
          log.flush()
        if evaluate:
          after_step(step, state)
        if save:
          ckpt.save(step, state, data_iter=data_iter,
                    meta={"train_seconds": seconds_before + time.time() - t_start})
      log.flush()
  ckpt.wait()
  return state
