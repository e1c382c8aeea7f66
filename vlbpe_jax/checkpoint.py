"""Orbax checkpoints holding the train state, the data-iterator state and the config.

One checkpoint step is a directory with up to four items:
  state     the state pytree (`{"step", "params", "opt", ...}`), sharded arrays via tensorstore
  data_iter the grain iterator state (optional), so a resumed run sees the same batches: one
            file per data shard (`data/iter_state.py`), restorable with another process count
  config    the run's config as JSON
  meta      JSON facts of the run up to this step (optional), e.g. {"train_seconds": 81.2},
            so records of a resumed run add up as one run's

  ckpt = Checkpointer(os.path.join(workdir, "ckpt"), config=config, must_match=("vq.model",))
  ckpt.save(step, state, data_iter=it, meta={"train_seconds": t})  # async; keeps the last k
  state = ckpt.restore(abstract_state, data_iter=it)   # onto the shardings in abstract_state
  ckpt.meta()                                          # the latest step's meta ({} if none)

`abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set, so a checkpoint
saved on one mesh restores onto any other (or one device). A checkpoint whose tree, shapes or
dtypes differ from `abstract_state`, or whose config differs at a `must_match` key (any
`data_shards` aside: the data iterator's per-shard files check the layout), is refused with a
ValueError listing every bad path.
"""

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # as orbax's default handler

from vlbpe_jax import manifest

# Orbax writes a replicated array in slices, one per replica ("replica-parallel"; its default
# off GPU), and cuts each slice with a jitted op per device and shape: compiled on first use,
# so a first save of a small replicated state costs more than its bytes (the tiny pipeline's
# dit stage on 8 CPU devices: 176 slice programs, ~5 s of its ~45). Arrays whose per-replica
# slice would be smaller than this are written by one replica; large ones stay parallel.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


def _array_registry():
  """Orbax's default type handlers, with jax.Array's replica-parallel writes for large slices
  only (`REPLICA_PARALLEL_MIN_SLICE_BYTES`)."""
  arrays = ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(),
      min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES)
  return ocp.type_handlers.create_type_handler_registry(
      *[(ty, ocp.type_handlers.get_type_handler(ty))
        for ty in ocp.type_handlers.supported_types()], (jax.Array, arrays))


class _StateHandler(ocp.StandardCheckpointHandler):
  """`StandardCheckpointHandler` (same arguments, checks and files) over `_array_registry`."""

  def __init__(self):
    super().__init__()
    # The standard handler delegates to a PyTree handler on the global registry (orbax
    # 0.12.8, pinned); the same handler on our registry changes only how arrays are cut.
    self._impl = ocp.PyTreeCheckpointHandler(type_handler_registry=_array_registry())


# Orbax finds an item's handler by the exact class its args are registered with.
@ocp.args.register_with_handler(_StateHandler, for_save=True)
@dataclasses.dataclass
class _StateSave(ocp.args.StandardSave):
  pass


@ocp.args.register_with_handler(_StateHandler, for_restore=True)
@dataclasses.dataclass
class _StateRestore(ocp.args.StandardRestore):
  pass


def _config_dict(config):
  if config is None:
    return {}
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=str))


# Config leaves no checkpoint is refused for: the data layout, which the data iterator's
# per-shard files check instead (data/iter_state.py), so that a run resumes under another
# `data_shards` (e.g. 0 -> the process count it stood for) whenever those files allow it.
LAYOUT_KEYS = ("data_shards",)


def _without_layout(d):
  if not isinstance(d, dict):
    return d
  return {k: _without_layout(v) for k, v in d.items() if k not in LAYOUT_KEYS}


def _lookup(d, dotted):
  for part in dotted.split("."):
    if not isinstance(d, dict) or part not in d:
      return "<missing>"
    d = d[part]
  return d


def _path_str(path) -> str:
  """`['opt'][0]['mu']`: attribute keys (NamedTuple fields, e.g. optax states) are written like
  dict keys, as orbax's metadata tree holds NamedTuples as dicts."""
  return "".join(f"[{getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))!r}]"
                 for k in path)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for our three items."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               config=None, must_match: tuple[str, ...] = ()):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep}: expected >= 1")
    self.directory = os.path.abspath(directory)
    self._config = _config_dict(config)
    self._must_match = tuple(must_match)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    # Handlers are named up front so that metadata of a checkpoint written by another
    # process can be read before restoring; the grain iterator handler is added on first use.
    handlers = {"state": _StateHandler(), "config": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    try:  # grain is absent on some accelerator hosts
      from vlbpe_jax.data import iter_state  # pylint: disable=g-import-not-at-top
      handlers["data_iter"] = iter_state.DataIterHandler()
    except ImportError:
      pass
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self):
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def save(self, step: int, state, *, data_iter=None, meta: dict | None = None,
           force: bool = False) -> bool:
    """Starts an (async) save of `state` (+ iterator state, + `meta`) at `step`."""
    items = dict(state=_StateSave(state),
                 config=ocp.args.JsonSave(self._config))
    if meta is not None:
      items["meta"] = ocp.args.JsonSave(dict(meta))
    if data_iter is not None:
      from vlbpe_jax.data import iter_state  # pylint: disable=g-import-not-at-top
      items["data_iter"] = iter_state.DataIterSave(data_iter)
    return self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, *, step=None, data_iter=None):
    """Restores the state at `step` (default: latest) onto `abstract_state`'s shardings.

    If `data_iter` is given, its position is restored in place.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise ValueError(f"no checkpoint in {self.directory}")
    if step not in self._mngr.all_steps():
      raise ValueError(f"step={step}: no such checkpoint in {self.directory}; "
                       f"have {self.all_steps()}")
    self._check_config(step)
    self._check_tree(step, abstract_state)
    items = dict(state=_StateRestore(abstract_state))
    if data_iter is not None:
      from vlbpe_jax.data import iter_state  # pylint: disable=g-import-not-at-top
      items["data_iter"] = iter_state.DataIterRestore(data_iter)
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def saved_config(self, step=None) -> dict:
    step = self.latest_step() if step is None else step
    return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
        "config"]

  def meta(self, step=None) -> dict:
    """The `meta` saved at `step` (default: latest); {} when that step has none."""
    step = self.latest_step() if step is None else step
    if step is None or not os.path.isdir(os.path.join(self.directory, str(step), "meta")):
      return {}
    return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        "meta"]

  def _check_config(self, step):
    if not self._must_match:
      return
    # Leaves at a neutral default count as absent on both sides (checkpoints written before
    # the field existed still match).
    saved, config = (manifest.drop_neutral_defaults(_without_layout(c))
                     for c in (self.saved_config(step), self._config))
    bad = [f"{k}: checkpoint has {_lookup(saved, k)!r}, config has {_lookup(config, k)!r}"
           for k in self._must_match if _lookup(saved, k) != _lookup(config, k)]
    if bad:
      raise ValueError(f"checkpoint {self.directory} step {step} was written with another "
                       "config:\n  " + "\n  ".join(bad))

  def _check_tree(self, step, abstract_state):
    meta = self._mngr.item_metadata(step)["state"]
    meta = getattr(meta, "tree", meta)
    saved = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(meta)[0]}
    want = {_path_str(p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    bad = [f"{p}: missing in checkpoint" for p in want if p not in saved]
    bad += [f"{p}: in checkpoint but not expected" for p in saved if p not in want]
    for p in want.keys() & saved.keys():
      s, w = saved[p], want[p]
      s_shape, w_shape = tuple(getattr(s, "shape", ())), tuple(getattr(w, "shape", ()))
      if s_shape != w_shape:
        bad.append(f"{p}: checkpoint shape {s_shape}, expected {w_shape}")
      elif (getattr(s, "dtype", None) is not None and getattr(w, "dtype", None) is not None
            and np.dtype(s.dtype) != np.dtype(w.dtype)):
        bad.append(f"{p}: checkpoint dtype {np.dtype(s.dtype)}, expected {np.dtype(w.dtype)}")
    if bad:
      raise ValueError(f"checkpoint {self.directory} step {step} does not match the expected "
                       f"state ({len(bad)} problems):\n  " + "\n  ".join(sorted(bad)))

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def restore_latest(directory: str, abstract_state, *, what: str, hint: str, config=None,
                   must_match: tuple[str, ...] = ()):
  """The latest checkpoint's state in `directory` (a finished stage's, read by a later one):
  ValueError "no {what} checkpoint in {directory}: {hint}" when it holds none; `config` and
  `must_match` as for `Checkpointer`."""
  with Checkpointer(directory, async_save=False, config=config, must_match=must_match) as ckpt:
    if ckpt.latest_step() is None:
      raise ValueError(f"no {what} checkpoint in {directory}: {hint}")
    return ckpt.restore(abstract_state)


def abstract_like(tree, shardings):
  """`ShapeDtypeStruct`s of `tree` (arrays or abstract values) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
