"""Stage manifests: every stage's outputs are keyed by everything that produced them.

A manifest `workdir/manifests/<stage>.json` records
  key      {"config": the config fields the stage and every stage it reads from use,
            "inputs": {upstream stage: digest of that stage's outputs}}
  status   "running" (written before the stage writes anything) or "done"
  outputs  {relative path: sha256} of the files later stages read (when done)
  seconds  wall seconds spent in the stage, summed over the invocations that ended

The rule (vlbpe_jax/train.py applies it to every stage): a stage whose manifest key equals
the current one is skipped when done and resumed when running; any other stage is recomputed
from scratch, and so, through the input digests, is everything downstream. A stage that holds
a training run is not deleted silently: it is refused with the changed fields and the command
that recomputes it.

  key = manifest.stage_key(config_dict, ("seed", "vq"), {"data": "ab12..."})
  diff = manifest.describe_changes(old["key"], key)   # ["config vq.total_steps: 4800 -> 4"]
"""

import glob
import json
import os

from vlbpe_jax import fileio

# Config leaves that only change what is shown or logged, never a result: not part of keys.
COSMETIC = ("progress", "report_examples", "num_token_maps", "grid_images", "log_every")
# Config leaves (any section) whose default means "as before the field existed": left out of
# keys while at it. data_shards 0: one data shard per process; clip.hard_negatives and
# clip.twin_images (): none; clip.model.conv_stem (): the patchify; lm.denoise_ns /
# lm.denoise_shots: data/icl.TRAIN_DENOISE's (tested);
# lm.text_phases (): stage 0 is the one mixed phase; lm.vqa_branches False: one line.
NEUTRAL_DEFAULTS = {"data_shards": 0, "hard_negatives": [], "twin_images": [], "conv_stem": [],
                    "vqa_questions": 0, "vqa_branches": False, "text_phases": [],
                    "denoise_ns": [2],
                    "denoise_shots": list(range(1, 11))}


def config_dict(config) -> dict:
  """The config as every key sees it (manifests, LM checkpoints, stored LM results): JSON
  types, `lm.seed` left out while it means `seed` (-1, its default, or the same value) and
  every `NEUTRAL_DEFAULTS` leaf while at its default, so that keys stored before those fields
  existed still match, and a changed LM seed changes only the keys that read `lm`."""
  d = json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config,
                            default=str))
  lm = d.get("lm")
  if isinstance(lm, dict) and lm.get("seed", -1) in (-1, d.get("seed")):
    lm.pop("seed", None)
  return drop_neutral_defaults(d)


def drop_neutral_defaults(d):
  """`d` (JSON types) without the `NEUTRAL_DEFAULTS` leaves that hold their default (in place)."""
  if isinstance(d, dict):
    for k, default in NEUTRAL_DEFAULTS.items():
      if k in d and d[k] == default:
        del d[k]
    for v in d.values():
      drop_neutral_defaults(v)
  return d


def path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, "manifests", f"{stage}.json")


def load(workdir: str, stage: str) -> dict | None:
  """The stage's manifest, or None; a torn one raises CorruptArtifactError naming it."""
  p = path(workdir, stage)
  if not os.path.exists(p):
    return None
  m = fileio.read_json(p, what=f"manifest of stage {stage!r}")
  if not isinstance(m, dict) or not {"key", "status"} <= set(m):
    raise fileio.CorruptArtifactError(
        f"manifest {p} lacks 'key'/'status'; delete it to recompute stage {stage!r}")
  return m


def save(workdir: str, stage: str, manifest: dict):
  fileio.write_json(path(workdir, stage), manifest, indent=1)


def remove(workdir: str, stage: str):
  p = path(workdir, stage)
  if os.path.exists(p):
    os.remove(p)


def _lookup(d: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(d, dict) or part not in d:
      return "<missing>"
    d = d[part]
  return d


def _strip_cosmetic(v):
  if isinstance(v, dict):
    return {k: _strip_cosmetic(x) for k, x in v.items() if k not in COSMETIC}
  return v


def stage_key(config_dict: dict, config_keys, inputs: dict) -> dict:
  """The key of a stage: the named config fields (dotted paths, cosmetic leaves dropped) and
  the digests of the upstream outputs it reads."""
  cfg = fileio.json_safe(config_dict)
  return {"config": {k: _strip_cosmetic(_lookup(cfg, k)) for k in sorted(set(config_keys))},
          "inputs": dict(sorted(inputs.items()))}


def _flat(d, prefix=""):
  if isinstance(d, dict) and d:
    out = {}
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  return {prefix: d}


def describe_changes(old: dict | None, new: dict) -> list[str]:
  """Human-readable differences between two keys, e.g. 'config vq.total_steps: 4800 -> 4'."""
  if old is None:
    return ["no manifest (made by an older version of the pipeline, or never finished)"]
  out = []
  for part in ("config", "inputs"):
    a, b = _flat(old.get(part, {})), _flat(new.get(part, {}))
    for k in sorted(a.keys() | b.keys()):
      if a.get(k, "<missing>") != b.get(k, "<missing>"):
        what = "output digest of stage" if part == "inputs" else "config"
        after = (_short(b[k]) if k in b else "<missing>" if part == "inputs" else
                 "(no longer in the key: the stage does not read it)")
        out.append(f"{what} {k}: {_short(a.get(k, '<missing>'))} -> {after}")
  if not out and old != new:  # the same values under other key paths
    out.append("the key's layout (the same values, grouped otherwise: made by an older "
               "version of the pipeline)")
  return out


def _short(v) -> str:
  s = repr(v)
  return s if len(s) <= 60 else s[:57] + "..."


def output_digests(workdir: str, patterns) -> dict:
  """{relative path: sha256} of every file matching `patterns` (globs relative to workdir;
  a folder stands for every file under it)."""
  out = {}
  for pattern in patterns:
    for p in sorted(glob.glob(os.path.join(workdir, pattern))):
      files = ([os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs]
               if os.path.isdir(p) else [p])
      for f in sorted(files):
        out[os.path.relpath(f, workdir)] = fileio.file_digest(f)
  return out


def changed_outputs(workdir: str, manifest: dict, patterns) -> list[str]:
  """Files whose content differs from what the manifest recorded (or that appeared/vanished)."""
  now = output_digests(workdir, patterns)
  was = manifest.get("outputs", {})
  return sorted(k for k in now.keys() | was.keys() if now.get(k) != was.get(k))
