"""Counts the programs jax lowers while a block runs (a jitted call whose compiled program is
cached lowers nothing, even with the persistent compilation cache of conftest.py, which is only
consulted after lowering)."""

import contextlib

import jax

LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # jax/_src/dispatch.py


@contextlib.contextmanager
def lowerings():
  """`with lowerings() as n: ...`; then `len(n)` programs were lowered inside the block."""
  seen = []

  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == LOWERING_EVENT:
      seen.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
