"""Artifacts on disk: torn files are named, writes are atomic with the user's umask, strict
JSON, and the records of a resumed run (train seconds, metrics, event files) read as one run."""

import json
import os
import stat
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

import lm_train_helpers as helpers
import test_vq_summary
from vlbpe_jax import checkpoint
from vlbpe_jax import fileio
from vlbpe_jax import loop
from vlbpe_jax import manifest
from vlbpe_jax import parallel
from vlbpe_jax import summary
from vlbpe_jax.bpe import model as bpe_model
from vlbpe_jax.data import text_tokenizer
from vlbpe_jax.eval import report
from vlbpe_jax.lm import sequences
from vlbpe_jax.lm import train

_V = 6  # base vocabulary of the fake VQ codes


def _tear(path, size=None):
  """Truncates `path` to `size` bytes (default: half), as a crash mid-write would."""
  os.truncate(path, os.path.getsize(path) // 2 if size is None else size)


def _texts(n=300):
  colors, shapes_ = ("red", "green", "blue", "pink"), ("circle", "square", "star")
  return [f"the {colors[i % 4]} {shapes_[i % 3]} is {i} cells left of a {colors[i % 3]} one."
          for i in range(n)]


def _codes(n=6):
  return np.random.default_rng(0).integers(0, _V, (n, 4, 4)).astype(np.int32)


def _visual_workdir(w):
  """`vq/` and `bpe/` outputs of a split 'train', written as the vq and bpe stages write them."""
  codes = _codes()
  fileio.save_npy(os.path.join(w, "vq", "codes_train.npy"), codes)
  fileio.write_json(os.path.join(w, "vq", "codes_meta.json"),
                    {"codebook_size": _V, "grid": [4, 4]})
  bpe = bpe_model.VisualBPE.learn(codes, _V, 4, progress=False)
  vocab = os.path.join(w, "bpe", "bpe.json")
  bpe.save(vocab)
  fileio.save_npz(os.path.join(w, "bpe", "tokens_train.npz"),
                  bpe_digest=np.array(fileio.short_digest(vocab)), **bpe.encode(codes))


# Each case writes a valid artifact under `w` with the package's writer and returns
# (the file to tear, the loader the package reads it with).
def _bpe_json(w):
  path = os.path.join(w, "bpe.json")
  bpe_model.VisualBPE.learn(_codes(), _V, 4, progress=False).save(path)
  return path, lambda: bpe_model.VisualBPE.load(path)


def _visual(relpath, kind):
  def case(w):
    _visual_workdir(w)
    return os.path.join(w, relpath), lambda: sequences.load_visual_tokens(
        w, kind, vq_start=300, splits=("train",))
  return case


def _manifest(w):
  manifest.save(w, "bpe", {"key": manifest.stage_key({"seed": 0}, ("seed",), {"vq": "ab"}),
                           "status": "done", "outputs": {"bpe/bpe.json": "cd" * 32}})
  return manifest.path(w, "bpe"), lambda: manifest.load(w, "bpe")


def _report(what):
  def case(w):
    report.add_section(w, key="bpe", title="Visual BPE", order=30, html="<p>" + "x" * 200,
                       metrics={"bpe.compression": 2.5, "bpe.num_merges": 4})
    if what == "metrics":
      return os.path.join(w, "report", "metrics.json"), lambda: report.read_metrics(w)
    return (os.path.join(w, "report", "sections", "bpe.json"),
            lambda: report.section_metrics(w, "bpe"))
  return case


def _text_model(w):
  path = os.path.join(w, "text.model")
  text_tokenizer.TextTokenizer.train(_texts(), vocab_size=300, model_path=path)
  return path, lambda: text_tokenizer.TextTokenizer.load(path)


def _json(name, obj):
  def case(w):
    path = os.path.join(w, name)
    fileio.write_json(path, obj)
    return path, lambda: fileio.read_json(path)
  return case


def _array(name):
  def case(w):
    path = os.path.join(w, name)
    if name.endswith(".npz"):
      fileio.save_npz(path, tokens=_codes().reshape(6, -1), lengths=np.full(6, 16, np.int32))
      return path, lambda: fileio.load_npz(path)
    fileio.save_npy(path, _codes())
    return path, lambda: fileio.load_npy(path)
  return case


TORN_CASES = {
    "bpe.json": _bpe_json,
    "sequences:vq/codes_train.npy": _visual("vq/codes_train.npy", "vq"),
    "sequences:vq/codes_meta.json": _visual("vq/codes_meta.json", "bpe"),
    "sequences:bpe/bpe.json": _visual("bpe/bpe.json", "bpe"),
    "sequences:bpe/tokens_train.npz": _visual("bpe/tokens_train.npz", "bpe"),
    "manifest": _manifest,
    "report/metrics.json": _report("metrics"),
    "report/sections/bpe.json": _report("section"),
    "text.model": _text_model,
    "codes_meta.json": _json("codes_meta.json", {"codebook_size": 512, "grid": [8, 8]}),
    "stats.json": _json("stats.json", {"total_s": 1.25, "merges": 4, "count_s": [0.5] * 8}),
    "result.json": _json("result.json", {"vqa/accuracy": 0.5, "seen": float("nan"),
                                         "config": {"seed": 0, "lm.batch_size": 8}}),
    "tokens.npz": _array("tokens.npz"),
    "codes.npy": _array("codes.npy"),
}


@pytest.mark.parametrize("case", sorted(TORN_CASES))
def test_torn_artifact_is_named_with_the_recovery(tmp_path, case):
  path, load = TORN_CASES[case](str(tmp_path))
  load()  # the intact artifact reads
  _tear(path)
  with pytest.raises(ValueError) as e:
    load()
  assert path in str(e.value) and "delete" in str(e.value), str(e.value)


def _model_cuts(path):
  """Truncation points of a .model at protobuf field boundaries: after half of the pieces,
  and after the trainer spec (the normalizer spec lost). Each parses as a shorter model."""
  data = open(path, "rb").read()
  m = sp_pb2.ModelProto.FromString(data)
  half = sp_pb2.ModelProto(pieces=m.pieces[:len(m.pieces) // 2]).SerializeToString()
  no_norm = sp_pb2.ModelProto(pieces=m.pieces, trainer_spec=m.trainer_spec).SerializeToString()
  assert data.startswith(half) and data.startswith(no_norm) and len(no_norm) < len(data)
  return {"half_the_pieces": len(half), "no_normalizer_spec": len(no_norm)}


@pytest.mark.parametrize("cut", ["half_the_pieces", "no_normalizer_spec"])
def test_text_model_torn_at_a_field_boundary_is_named(tmp_path, cut):
  path, load = _text_model(str(tmp_path))
  _tear(path, _model_cuts(path)[cut])
  with pytest.raises(ValueError, match="delete") as e:
    load()
  assert path in str(e.value)


def _metric_lines(logdir, steps):
  w = summary.MetricWriter(logdir)
  for s in steps:
    w.write_scalars(s, {"train/loss": 1.0 / s, "train/lr": 1e-3})
  w.close()
  return os.path.join(logdir, "metrics.jsonl")


def test_metrics_jsonl_torn_middle_line_is_named(tmp_path):
  path = _metric_lines(str(tmp_path), [1, 2, 3, 4])
  lines = open(path).read().splitlines(keepends=True)
  fileio.write_text(path, lines[0] + lines[1][:len(lines[1]) // 2] + "\n" + "".join(lines[2:]))
  with pytest.raises(ValueError, match="line 2") as e:
    summary.read_jsonl(path)
  assert path in str(e.value) and "delete" in str(e.value)
  with pytest.raises(ValueError, match="line 2"):
    summary.MetricWriter(str(tmp_path), resume_step=4)


@pytest.mark.parametrize("newline", [False, True])
def test_metrics_jsonl_torn_last_line_is_dropped(tmp_path, newline):
  path = _metric_lines(str(tmp_path), [1, 2, 3])
  with open(path, "a") as f:
    f.write('{"step": 4, "train/lo' + ("\n" if newline else ""))
  assert [r["step"] for r in summary.read_jsonl(path)] == [1, 2, 3]
  w = summary.MetricWriter(str(tmp_path), resume_step=4)
  w.write_scalars(4, {"train/loss": 0.25})
  w.close()
  assert [r["step"] for r in summary.read_jsonl(path)] == [1, 2, 3, 4]
  assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3, 4]


def _boom(*args):
  raise OSError("simulated crash before the rename")


@pytest.mark.parametrize("writer", ["write_json", "save_npz", "save_npy", "write_bytes"])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, writer):
  path = str(tmp_path / "artifact")
  write = {"write_json": lambda: fileio.write_json(path, {"new": list(range(1000))}),
           "save_npz": lambda: fileio.save_npz(path, a=np.arange(1000)),
           "save_npy": lambda: fileio.save_npy(path, np.arange(1000)),
           "write_bytes": lambda: fileio.write_bytes(path, b"new" * 1000)}[writer]
  fileio.write_json(path, {"old": 1})
  old = open(path, "rb").read()
  monkeypatch.setattr(os, "replace", _boom)
  with pytest.raises(OSError, match="simulated"):
    write()
  assert open(path, "rb").read() == old
  assert os.listdir(tmp_path) == ["artifact"]
  monkeypatch.undo()
  write()  # the same write without the crash replaces the file
  assert open(path, "rb").read() != old and os.listdir(tmp_path) == ["artifact"]


def _write_everything(w):
  fileio.write_json(os.path.join(w, "a.json"), {"a": 1})
  fileio.save_npz(os.path.join(w, "a.npz"), a=np.arange(3))
  report.add_section(w, key="vq", title="VQ", order=10, html="<p>", metrics={"vq.psnr": 30.0})
  report.save_image(w, "vq/pairs.png", np.zeros((4, 4, 3), np.uint8))
  return [os.path.join(w, p) for p in ("a.json", "a.npz", "report/index.html",
                                       "report/metrics.json", "report/sections/vq.json",
                                       "report/vq/pairs.png")]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path, umask, mode):
  old = os.umask(umask)
  try:
    paths = _write_everything(str(tmp_path))
  finally:
    os.umask(old)
  assert {p: oct(stat.S_IMODE(os.stat(p).st_mode)) for p in paths} == {
      p: oct(mode) for p in paths}


def test_json_is_strict_with_nulls_for_non_finite(tmp_path):
  path = str(tmp_path / "result.json")
  fileio.write_json(path, {"a": float("nan"), "b": [float("inf"), -np.inf, np.float32(1.5)]})

  def refuse(name):
    raise ValueError(f"non-standard JSON constant {name}")

  text = open(path).read()
  assert json.loads(text, parse_constant=refuse) == {"a": None, "b": [None, None, 1.5]}
  assert fileio.read_json(path) == {"a": None, "b": [None, None, 1.5]}


def test_checkpoint_meta_per_step(tmp_path):
  state = {"step": jnp.array(0, jnp.int32), "w": jnp.arange(4.0)}
  with checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False) as ckpt:
    ckpt.save(1, state, meta={"train_seconds": 1.5})
    ckpt.save(2, state, meta={"train_seconds": 4.25, "note": "resumed"})
    ckpt.save(3, state)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  assert ckpt.meta(1) == {"train_seconds": 1.5}
  assert ckpt.meta(2) == {"train_seconds": 4.25, "note": "resumed"}
  assert ckpt.meta(3) == {} and ckpt.meta() == {}
  ckpt.close()
  assert checkpoint.Checkpointer(str(tmp_path / "empty")).meta() == {}


def _event_steps(logdir):
  names = [n for n in os.listdir(logdir) if n.startswith("events.out.tfevents.")]
  assert names == [summary.EVENTS_NAME]
  # pylint: disable=protected-access  (the TFRecord and Event parsers of test_vq_summary)
  event_cls = test_vq_summary._event_class()
  records = test_vq_summary._records(os.path.join(logdir, names[0]))
  events = [event_cls.FromString(r) for r in records]
  assert events[0].file_version == "brain.Event:2"
  return [e.step for e in events[1:]], events


def test_vq_metric_writer_resumed_reads_as_one_run(tmp_path):
  logdir = str(tmp_path)
  fileio.write_bytes(os.path.join(logdir, "events.out.tfevents.123.host"), b"old run")
  w = summary.MetricWriter(logdir)
  for s in range(1, 6):
    w.write_scalars(s, {"train/loss": float(s)})
  w.close()  # preempted after step 5; the checkpoint restored holds step 3
  w = summary.MetricWriter(logdir, resume_step=3)
  for s in range(4, 7):
    w.write_scalars(s, {"train/loss": 10.0 * s})
  w.close()
  rows = summary.read_jsonl(os.path.join(logdir, "metrics.jsonl"))
  assert [(r["step"], r["train/loss"]) for r in rows] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
  steps, events = _event_steps(logdir)  # also: the old-style event file is gone
  assert steps == [1, 2, 3, 4, 5, 6]
  assert [e.summary.value[0].simple_value for e in events[1:]] == [1, 2, 3, 40, 50, 60]


@pytest.mark.slow  # a tokenizer and a jitted text-model step
def test_lm_resumed_run_sums_train_seconds_and_logs_each_step_once(tmp_path, monkeypatch):
  config = helpers.make_config(text_steps=3)
  workdir = str(tmp_path)
  tok = helpers.tokenizer(workdir)
  plan = train.plan_of(config, "text")
  trainer = train.Trainer(config, train.make_model(config, tok),
                          parallel.mesh_from_config(config.mesh))
  make_iter = train.iterator_fn(config, tok, helpers.examples("train"), None)
  # The clock jumps by 1000 s while the first process initialises the state (timed, like its
  # steps): its seconds are > 1000, the resumed process's (which restores) far fewer, so only
  # a sum keeps the total above the first's.
  clock = types.SimpleNamespace(offset=0.0)
  monkeypatch.setattr(loop, "time", types.SimpleNamespace(
      time=lambda: time.time() + clock.offset))
  init = trainer.init

  def slow_init(*args):
    clock.offset += 1000.0
    return init(*args)

  monkeypatch.setattr(trainer, "init", slow_init)
  run_dir = train.text_dir(workdir)
  go = lambda **kw: train.run_plan(  # noqa: E731
      config, run_dir, trainer, plan, make_iter, name="text",
      must_match=train.TEXT_MUST_MATCH, **kw)
  go(stop_at_step=2)
  ckpt_dir = os.path.join(run_dir, "ckpt")
  ckpt = checkpoint.Checkpointer(ckpt_dir)
  assert ckpt.latest_step() == 2
  at_stop = ckpt.meta(2)["train_seconds"]
  ckpt.close()
  assert at_stop > 1000 and loop.train_seconds(ckpt_dir) == at_stop
  # The preempted process logged step 3 and began a line before its checkpoint was written.
  log = os.path.join(run_dir, "metrics.jsonl")
  with open(log, "a") as f:
    f.write(json.dumps({"step": 3, "train/loss": -1.0}) + '\n{"step": 4, "train/lo')
  start = time.time()
  go()
  resumed_for = time.time() - start
  total = loop.train_seconds(ckpt_dir)
  assert at_stop < total <= at_stop + resumed_for
  with checkpoint.Checkpointer(ckpt_dir) as ckpt:
    assert ckpt.meta(2)["train_seconds"] == at_stop and ckpt.latest_step() == 3
  rows = [json.loads(line) for line in open(log)]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(r["train/loss"] > 0 for r in rows)


def test_lm_final_loss_reads_the_last_whole_loss(tmp_path):
  from vlbpe_jax.lm import stage as lm_stage  # pylint: disable=g-import-not-at-top
  path = _metric_lines(str(tmp_path), [1, 2, 4])
  with open(path, "a") as f:
    f.write('{"step": 5, "eval/acc": 0.5}\n{"step": 6, "train/lo')  # no loss, then torn
  assert lm_stage.final_loss(str(tmp_path)) == 0.25
  with pytest.raises(ValueError, match="no training log"):
    lm_stage.final_loss(str(tmp_path / "missing"))
