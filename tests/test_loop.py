"""The shared training loop on a 3-weight linear model: resume == uninterrupted, NaN stop,
metrics lines once per step, hooks at their steps."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlbpe_jax import checkpoint
from vlbpe_jax import loop
from vlbpe_jax import summary

TX = optax.adam(0.1)


def _data(offset=0.0):
  """Endless shuffled batches x: [2, 3] float32 of 10 distinct rows (+ offset)."""
  rows = np.arange(30, dtype=np.float32).reshape(10, 3) / 30 + offset
  return iter(grain.MapDataset.source(rows).shuffle(seed=0).repeat().batch(2))


def _init():
  params = {"w": jnp.zeros((3,), jnp.float32)}
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": TX.init(params)}


def _abstract():
  state = jax.eval_shape(_init)
  sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return checkpoint.abstract_like(state, jax.tree.map(lambda _: sh, state))


def _make_step(nan_at=None):
  """A jitted step fitting x @ w to 1; the loss is NaN at 1-based step `nan_at`."""
  def step(state, x):
    loss_fn = lambda p: jnp.mean((x @ p["w"] - 1.0) ** 2)  # noqa: E731
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = TX.update(grads, state["opt"])
    if nan_at is not None:
      loss = jnp.where(state["step"] + 1 == nan_at, jnp.nan, loss)
    return ({"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
             "opt": opt}, {"loss": loss, "x_sum": jnp.sum(x)})
  jitted = jax.jit(step, donate_argnums=(0,))
  return lambda state, batch: jitted(state, jax.device_put(batch))


def _run(run_dir, total=6, data=_data, step_fn=None, **kw):
  """restore_or_init + fit as a trainer does; returns the final state on the host."""
  with checkpoint.Checkpointer(os.path.join(run_dir, "ckpt")) as ckpt:
    it = data()
    state, start, seconds = loop.restore_or_init(ckpt, _abstract(), _init, it)
    with summary.MetricWriter(run_dir, resume_step=start) as writer:
      kw = {"log_every": 1, "ckpt_every": 100, **kw}
      state = loop.fit(state, step_fn or _make_step(), it, total_steps=total, ckpt=ckpt,
                       writer=writer, name="toy", progress=False, seconds_before=seconds, **kw)
  return jax.tree.map(np.asarray, jax.device_get(state))


def _rows(run_dir):
  return summary.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def test_resume_after_a_stop_equals_the_uninterrupted_run(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  straight = _run(a, items_per_step={"perf/rows_per_s": 2})
  _run(b, stop_at_step=3)
  with checkpoint.Checkpointer(os.path.join(b, "ckpt")) as ckpt:
    assert ckpt.all_steps() == [3]
    stopped_for = ckpt.meta()["train_seconds"]
  # The preempted process logged steps 4-5 and tore a line before its checkpoint was written.
  with open(os.path.join(b, "metrics.jsonl"), "a") as f:
    f.write('{"step": 4, "train/loss": -1}\n{"step": 5, "train/loss": -1}\n{"step": 6, "tr')
  resumed = _run(b)
  assert int(resumed["step"]) == 6
  jax.tree.map(np.testing.assert_array_equal, straight, resumed)
  ra, rb = _rows(a), _rows(b)
  assert [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]
  # The same batches (the iterator resumed at its position) and losses, step for step.
  for key in ("train/x_sum", "train/loss"):
    assert [r[key] for r in ra] == [r[key] for r in rb], key
  assert len({r["train/x_sum"] for r in ra}) > 1
  assert all(r["perf/rows_per_s"] == pytest.approx(2 / r["perf/step_time_s"]) for r in ra)
  assert stopped_for < loop.train_seconds(os.path.join(b, "ckpt"))


@pytest.mark.parametrize("nan_at", [3, 4])
def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, nan_at):
  """Step 4 is a checkpoint step: its checkpoint must not be written before its loss is seen."""
  run_dir = str(tmp_path)
  with pytest.raises(FloatingPointError, match=rf"toy: non-finite loss=nan at step {nan_at} "
                                               r"\(phase 7\); .*Last good checkpoint: step 2 "):
    _run(run_dir, step_fn=_make_step(nan_at), ckpt_every=2, extra_scalars=lambda s: {"phase": 7})
  with checkpoint.Checkpointer(os.path.join(run_dir, "ckpt")) as ckpt:
    assert ckpt.all_steps() == [2]
  assert [r["step"] for r in _rows(run_dir)] == list(range(1, nan_at))
  assert all(r["phase"] == 7 for r in _rows(run_dir))


def test_hooks_run_at_their_steps_and_a_switched_iterator_is_checkpointed(tmp_path):
  calls = []
  reset = jax.jit(lambda s: {**s, "opt": TX.init(s["params"])})  # under the transfer guard

  def before_step(step, state, it):
    calls.append(("before", step))
    if step == 2:  # a phase boundary: other data, the optimizer state reset
      return reset(state), _data(offset=100.0)
    return state, it

  def after_step(step, state):
    rows = _rows(str(tmp_path))
    calls.append(("after", step, int(jax.device_get(state["step"])), rows[-1]["step"]))

  _run(str(tmp_path), total=5, log_every=2, before_step=before_step, after_step=after_step,
       after_every=2)
  assert [c for c in calls if c[0] == "before"] == [("before", s) for s in range(5)]
  # after steps 2, 4 and the last, each once its metrics were written (log_every 2 + the last).
  assert [c for c in calls if c[0] == "after"] == [("after", s, s, s) for s in (2, 4, 5)]
  rows = _rows(str(tmp_path))
  assert [r["step"] for r in rows] == [2, 4, 5]
  assert rows[0]["train/x_sum"] < 100 < rows[1]["train/x_sum"]
  # The checkpoint holds the switched iterator's position: restoring it into a fresh one of
  # the second data set yields the batch after step 5's.
  it, expected = _data(offset=100.0), _data(offset=100.0)
  for _ in range(4):  # steps 3, 4, 5 drew 3 batches; the 4th is next
    want = next(expected)
  with checkpoint.Checkpointer(os.path.join(str(tmp_path), "ckpt")) as ckpt:
    ckpt.restore(_abstract(), data_iter=it)
  np.testing.assert_array_equal(next(it), want)


@pytest.mark.parametrize("kw,match", [({"log_every": 0}, "log_every=0"),
                                      ({"ckpt_every": -1}, "ckpt_every=-1"),
                                      ({"stop_at_step": 0}, "stop_at_step=0"),
                                      ({"check_keys": ("loss", "l2")}, r"\['l2'\] not in")])
def test_bad_arguments_are_named(tmp_path, kw, match):
  with pytest.raises(ValueError, match=match):
    _run(str(tmp_path), **kw)
