"""Atomic artifact writes, content digests and loaders that name the file they failed on.

Every artifact the package writes goes through `atomic_file`: the bytes land in a temporary
file in the same folder, which is renamed over the target only once complete, so a crash
leaves either the old file or the new one, never a torn one. The temporary file is created
with `open()`, so the result has the user's umask (0644 with the usual 022), not mkstemp's 0600.

  fileio.write_json(path, {"a": float("nan")})   # NaN/inf become null: always valid JSON
  fileio.save_npy(path, codes); fileio.save_npz(path, lengths=..., tokens=...)
  obj = fileio.read_json(path, what="visual BPE vocabulary")   # CorruptArtifactError names path
  fileio.file_digest(path)                                       # sha256 hex of the content
"""

import contextlib
import hashlib
import json
import math
import os
import secrets
import zipfile

import numpy as np


class CorruptArtifactError(ValueError):
  """An artifact on disk cannot be read (torn, truncated or edited); names the file."""


def _recovery(path: str) -> str:
  return (f"delete {path} (or its stage folder) and rerun the command that wrote it; the "
          "pipeline recomputes a missing artifact")


@contextlib.contextmanager
def atomic_file(path: str):
  """Yields a temporary path beside `path`; renames it onto `path` if the block succeeds."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path: str, data: bytes):
  with atomic_file(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def write_text(path: str, text: str):
  write_bytes(path, text.encode("utf-8"))


def json_safe(obj):
  """`obj` with NaN/inf floats replaced by None and numpy scalars/arrays made plain."""
  if isinstance(obj, dict):
    return {str(k): json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return json_safe(obj.tolist())
  if isinstance(obj, (np.bool_, bool)):
    return bool(obj)
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def dumps_json(obj, indent=None) -> str:
  """Strict JSON (no bare NaN): non-finite numbers are written as null."""
  return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(path: str, obj, indent=None):
  write_text(path, dumps_json(obj, indent=indent))


def save_npy(path: str, array):
  with atomic_file(path) as tmp:
    with open(tmp, "wb") as f:
      np.save(f, np.asarray(array))


def save_npz(path: str, **arrays):
  with atomic_file(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)


def read_json(path: str, what: str = "JSON file"):
  """Parsed JSON of `path`; a missing file raises FileNotFoundError, a torn one
  CorruptArtifactError naming the file and how to recover."""
  try:
    with open(path, "rb") as f:
      return json.loads(f.read().decode("utf-8"))
  except FileNotFoundError:
    raise
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CorruptArtifactError(f"{what} {path} is not valid JSON ({e}): the file is truncated "
                               f"or was edited; {_recovery(path)}") from e


def load_npy(path: str, what: str = "array file") -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise
  except (ValueError, EOFError, OSError) as e:
    raise CorruptArtifactError(f"{what} {path} cannot be read as .npy ({e}); "
                               f"{_recovery(path)}") from e


def load_npz(path: str, what: str = "array archive") -> dict:
  """All arrays of an .npz, read eagerly (a torn archive fails here, naming the file)."""
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except FileNotFoundError:
    raise
  except (ValueError, EOFError, OSError, zipfile.BadZipFile, KeyError) as e:
    raise CorruptArtifactError(f"{what} {path} cannot be read as .npz ({e}); "
                               f"{_recovery(path)}") from e


def file_digest(path: str) -> str:
  """sha256 hex digest of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def short_digest(path: str) -> str:
  """The first 16 hex digits of `file_digest`: what a derived artifact stores to name the file it
  was made from (BPE tokens name their vocabulary in `bpe_digest`; readers compare it)."""
  return file_digest(path)[:16]


def tree_digest(root: str) -> str:
  """sha256 over every file under `root` (relative paths and contents, sorted)."""
  h = hashlib.sha256()
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(folder, name)
      h.update(os.path.relpath(path, root).encode() + b"\0" + file_digest(path).encode())
  return h.hexdigest()


def value_digest(obj) -> str:
  """sha256 hex of the canonical JSON of `obj` (sorted keys)."""
  return hashlib.sha256(json.dumps(json_safe(obj), sort_keys=True).encode()).hexdigest()
