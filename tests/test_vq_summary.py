"""The TF-free TensorBoard writer: CRC-32C, TFRecord framing, Event protos (parsed by protobuf)."""

import json
import os
import struct

from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
import pytest

from vlbpe_jax import summary


def _event_class():
  """tensorboard's Event / Summary / Summary.Value, declared here from their field numbers."""
  f = descriptor_pb2.FileDescriptorProto(name="ev_test.proto", package="evtest")
  value = f.message_type.add(name="Value")
  value.field.add(name="tag", number=1, type=9, label=1)
  value.field.add(name="simple_value", number=2, type=2, label=1)
  summ = f.message_type.add(name="Summary")
  summ.field.add(name="value", number=1, type=11, label=3, type_name=".evtest.Value")
  ev = f.message_type.add(name="Event")
  ev.field.add(name="wall_time", number=1, type=1, label=1)
  ev.field.add(name="step", number=2, type=3, label=1)
  ev.field.add(name="file_version", number=3, type=9, label=1)
  ev.field.add(name="summary", number=5, type=11, label=1, type_name=".evtest.Summary")
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("evtest.Event"))


def _records(path):
  data = open(path, "rb").read()
  out, i = [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    assert struct.unpack("<I", data[i + 8:i + 12])[0] == summary._masked_crc(data[i:i + 8])
    payload = data[i + 12:i + 12 + n]
    assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == summary._masked_crc(payload)
    out.append(payload)
    i += 16 + n
  return out


def test_crc32c_known_value():
  assert summary.crc32c(b"123456789") == 0xE3069283
  assert summary.crc32c(b"") == 0


def test_events_parse_as_tensorboard_protos(tmp_path):
  w = summary.MetricWriter(str(tmp_path))
  w.write_scalars(7, {"train/loss": 0.5, "eval/psnr_db": 31.25})
  w.write_scalars(300, {"train/loss": 0.25})
  w.close()
  name = [n for n in os.listdir(tmp_path) if n.startswith("events.out.tfevents.")]
  assert len(name) == 1
  event_cls = _event_class()
  events = [event_cls.FromString(r) for r in _records(os.path.join(tmp_path, name[0]))]
  assert events[0].file_version == "brain.Event:2"
  assert events[1].step == 7 and events[2].step == 300
  vals = {v.tag: v.simple_value for v in events[1].summary.value}
  assert vals == {"train/loss": 0.5, "eval/psnr_db": 31.25}
  assert events[2].summary.value[0].simple_value == pytest.approx(0.25)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows == [{"step": 7, "train/loss": 0.5, "eval/psnr_db": 31.25},
                  {"step": 300, "train/loss": 0.25}]
