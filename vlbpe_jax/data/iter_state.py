"""Orbax handler of the data-iterator item: one JSON file per data shard or per process.

`pipeline.ShardedIterator` (the trainers' batches, `pipeline.sharded_iterator`) is saved as
`shard_<i>-of-<n>.json`, one file per data shard, each written by the process that reads that
shard, so that a checkpoint restores with any process count dividing `n`: each process reads its
own shards' files. Any other grain iterator goes through grain's own handler
(`process_<p>-of-<P>.json`, restorable only with the same process count). A process that reads
one shard `i` of `n` also restores from `process_<i>-of-<n>.json`: the file a trainer wrote
before its data was sharded, when process i of n read the rows that shard i of n reads now.

  handlers["data_iter"] = iter_state.DataIterHandler()
  ocp.args.Composite(data_iter=iter_state.DataIterSave(it))      # or DataIterRestore(it)
"""

import dataclasses
import json
from typing import Any

import grain
import orbax.checkpoint as ocp

from vlbpe_jax.data import pipeline


class DataIterHandler(grain.checkpoint.CheckpointHandler):
  """grain's handler, with per-shard files for a `pipeline.ShardedIterator`."""

  def save(self, directory, item=None, args=None):
    item = item or args.item
    if not isinstance(item, pipeline.ShardedIterator):
      return super().save(directory, item=item)
    for name, state in item.get_state().items():
      (directory / f"{name}.json").write_text(json.dumps(state, indent=1))

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    if not isinstance(item, pipeline.ShardedIterator):
      return super().restore(directory, item=item)
    files = {n: directory / f"{n}.json" for n in item.shard_names}
    if len(item.shards) == 1:  # or the same rows' file by process index (module docstring)
      (name, path), = files.items()
      legacy = directory / "process_{}-of-{}.json".format(*item.shards[0])
      if not path.exists() and legacy.exists():
        files[name] = legacy
    missing = [n for n, p in files.items() if not p.exists()]
    if missing:
      have = sorted(p.name for p in directory.iterdir())
      raise ValueError(f"data iterator checkpoint {directory} lacks {missing} (it holds {have}):"
                       " it was written with another number of data shards; restore it with "
                       "the data shards it was written with")
    item.set_state({n: json.loads(p.read_text()) for n, p in files.items()})
    return item


@ocp.args.register_with_handler(DataIterHandler, for_save=True)
@dataclasses.dataclass
class DataIterSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataIterHandler, for_restore=True)
@dataclasses.dataclass
class DataIterRestore(ocp.args.CheckpointArgs):
  item: Any
