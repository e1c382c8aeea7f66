"""Scalar metrics as TensorBoard event files plus JSON lines, without TensorFlow.

No TF-free TensorBoard writer is installed (tensorboardX, clu and TF are absent), so this
writes the two formats directly: `events.out.tfevents.*` are TFRecords of `Event` protos
(wall_time=1, step=2, file_version=3, summary=5 -> Value tag=1, simple_value=2), which
TensorBoard reads, and `metrics.jsonl` holds `{"step": s, "name": value, ...}` per call.

  with MetricWriter(os.path.join(workdir, "vq"), resume_step=restored_step) as w:
    w.write_scalars(step, {"train/loss": 0.1})

A resumed run reads as one run: the writer keeps the lines of steps <= `resume_step` (those
the restored checkpoint had seen) and drops the rest, and there is one event file per logdir,
rewritten from the kept lines, not a new file per restart. In a multi-process run only process
0 writes (the scalars are global); the others' writers do nothing.
"""

import json
import os
import struct
import time

import jax
import numpy as np

from vlbpe_jax import fileio

EVENTS_NAME = "events.out.tfevents.vlbpe"


def _crc32c_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(step: int, wall_time: float, scalars=None, file_version=None) -> bytes:
  """A serialized `tensorboard.Event` proto."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
  if file_version is not None:
    out += _field_bytes(3, file_version.encode())
  if scalars:
    values = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) +
                     struct.pack("<f", float(v)))
        for tag, v in scalars.items())
    out += _field_bytes(5, values)
  return out


def tfrecord(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", _masked_crc(header)) + data +
          struct.pack("<I", _masked_crc(data)))


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl; a torn last line (a crash mid-write) is dropped."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    lines = f.read().split("\n")
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i < len(lines) - 2:  # not the last line: the file was edited or damaged
        raise fileio.CorruptArtifactError(f"{path} line {i + 1} is not JSON ({e}); delete "
                                          "the file to start its log afresh") from e
  return out


class MetricWriter:
  """Appends scalars to `logdir/events.out.tfevents.vlbpe` and `logdir/metrics.jsonl`."""

  def __init__(self, logdir: str, resume_step: int = 0):
    self._events = self._jsonl = None
    if jax.process_index() != 0:
      return
    os.makedirs(logdir, exist_ok=True)
    jsonl = os.path.join(logdir, "metrics.jsonl")
    kept = [r for r in read_jsonl(jsonl) if int(r["step"]) <= resume_step]
    fileio.write_text(jsonl, "".join(json.dumps(r) + "\n" for r in kept))
    events = tfrecord(event_bytes(0, time.time(), file_version="brain.Event:2"))
    events += b"".join(tfrecord(event_bytes(int(r["step"]), time.time(),
                                            {k: v for k, v in r.items() if k != "step"}))
                       for r in kept)
    for name in os.listdir(logdir):  # earlier versions wrote one file per restart
      if name.startswith("events.out.tfevents.") and name != EVENTS_NAME:
        os.remove(os.path.join(logdir, name))
    path = os.path.join(logdir, EVENTS_NAME)
    fileio.write_bytes(path, events)
    self._events = open(path, "ab")
    self._jsonl = open(jsonl, "a")

  def write_scalars(self, step: int, scalars: dict):
    if self._jsonl is None:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._events.write(tfrecord(event_bytes(int(step), time.time(), scalars)))
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self.flush()

  def flush(self):
    if self._jsonl is not None:
      self._events.flush()
      self._jsonl.flush()

  def close(self):
    if self._jsonl is not None:
      self._events.close()
      self._jsonl.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
