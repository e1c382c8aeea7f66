"""Bad inputs to every CLI end in one line `error: ...` on stderr and exit 2, never a traceback.

Each case fails while parsing flags or checking inputs, before any training starts.
"""

import os
import subprocess
import sys

from absl import flags
import pytest

from vlbpe_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/tiny.py:tiny"
MAIN, VQ, LM, SHAPES = ("vlbpe_jax.main", "vlbpe_jax.vq.train", "vlbpe_jax.lm.train",
                        "vlbpe_jax.data.shapes")
CLIP, DIT, SAMPLE = "vlbpe_jax.clip.train", "vlbpe_jax.dit.train", "vlbpe_jax.dit.sample"
V2L, FEWSHOT, RESTORE = "vlbpe_jax.v2l.train", "vlbpe_jax.v2l.fewshot", "vlbpe_jax.v2l.restore"
PROMPTS = "--prompts={tmp}/prompts.txt"  # two captions (written below)
FILE = "{tmp}/a_file"  # a workdir/outdir that is a file
WORK = "--workdir={tmp}/w"

CASES = [  # (module, args, fragments of the error line); each jax CLI starts in ~3 s
    (MAIN, [TINY, WORK, "--config.vq.totl_steps=3"], ["--config.vq.totl_steps", "'total_steps'"]),
    (MAIN, ["--config=configs/nope.py:tiny", WORK], ["--config=configs/nope.py:tiny",
                                                     "No such file"]),
    (MAIN, ["--config=configs/tiny.py:bogus", WORK], ["'bogus'", "expected one of ['long', 'tiny']"]),
    (MAIN, [TINY, WORK, "--config.stages=nope"], ["stages='nope'"]),
    (MAIN, [TINY, f"--workdir={FILE}", "--config.stages=data"], ["--workdir=", "a directory"]),
    (VQ, [TINY, WORK, "--config.vq.totl_steps=3"], ["--config.vq.totl_steps", "'total_steps'"]),
    (VQ, [TINY, WORK, "--config.vq.total_steps=0"], ["vq.total_steps=0", "positive"]),
    (VQ, [TINY, WORK, "--config.vq.total_steps=abc"], ["--config.vq.total_steps", "abc"]),
    (VQ, [TINY, f"--workdir={FILE}"], ["--workdir=", "a directory"]),
    (LM, [TINY, WORK, "--config.vq.totl_steps=3"], ["--config.vq.totl_steps", "'total_steps'"]),
    (LM, [TINY, f"--workdir={FILE}"], ["--workdir=", "a directory"]),
    (LM, [TINY, WORK], ["run the 'data' stage first"]),  # an empty workdir: no inputs
    (CLIP, [TINY, WORK], ["run the 'data' stage first"]),
    (DIT, [TINY, WORK, "--config.dit.total_steps=0"], ["dit.total_steps=0", "positive"]),
    (SAMPLE, [WORK, PROMPTS, "--outdir={tmp}/o"], ["no checkpoint of design 'fm'"]),
    (SAMPLE, [WORK, "--prompts={tmp}/blank.txt", "--outdir={tmp}/o"], ["line(s) [2]", "empty"]),
    (SAMPLE, [WORK, "--prompts={tmp}/a_file", "--outdir={tmp}/o", "--num_samples=0"],
     ["num_samples=0", ">= 1"]),
    (V2L, [TINY, WORK], ["run the 'data' stage first"]),
    (FEWSHOT, [TINY, WORK, "--config.v2l.fewshot_global=9"], ["v2l.fewshot_global=9",
                                                              "v2l.num_global=5"]),
    (RESTORE, [TINY, WORK, "--config.v2l.restore_images=0"], ["v2l.restore_images=0"]),
    (V2L, [TINY, WORK, "--config.v2l.restore_text_only=0"], ["v2l.restore_text_only=0"]),
    (SHAPES, ["--outdir={tmp}/s", "--nmu=2"], ["'nmu'", "num"]),
    (SHAPES, ["--num=2"], ["--outdir"]),
    (SHAPES, ["--outdir={tmp}/s", "--num=abc"], ["--num", "abc"]),
    (SHAPES, ["--outdir={tmp}/s", "--split=dev"], ["--split", "dev"]),
    (SHAPES, [f"--outdir={FILE}", "--num=1"], ["a_file"]),
]


def _id(case):
  module, args, _ = case
  return module.split(".")[-2 if module.endswith("train") else -1] + ":" + " ".join(
      a.split("/")[-1] for a in args if a not in (TINY, WORK))


@pytest.mark.slow
@pytest.mark.parametrize("module, args, fragments", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_is_one_line(tmp_path, module, args, fragments):
  (tmp_path / "a_file").write_text("not a folder")
  (tmp_path / "prompts.txt").write_text("a red circle at the center.\na blue star.\n")
  (tmp_path / "blank.txt").write_text("a red circle at the center.\n\na blue star.\n")
  env = {k: v for k, v in os.environ.items() if k != "VLBPE_TRACEBACK"}
  env["JAX_PLATFORMS"] = "cpu"
  res = subprocess.run([sys.executable, "-m", module, *(a.format(tmp=tmp_path) for a in args)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                       check=False)
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
  assert [l for l in lines if l.startswith("error:")] == lines[-1:], res.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[-1]
  assert not os.path.exists(tmp_path / "w" / "vq") and not os.path.exists(tmp_path / "w" / "lm")
  assert res.stdout == ""


def _run_plain(main, capsys):
  with pytest.raises(SystemExit) as e:
    cli.run_plain(main)
  assert e.value.code == cli.EXIT_BAD_INPUT
  return capsys.readouterr().err


def test_run_plain_reports_flag_errors_and_multiline_messages(monkeypatch, capsys):
  monkeypatch.delenv("VLBPE_TRACEBACK", raising=False)

  def bad_flag():
    fv = flags.FlagValues()
    flags.DEFINE_integer("num", 1, "n", flag_values=fv)
    fv(["prog", "--nmu=2"])

  assert _run_plain(bad_flag, capsys) == (
      "error: Unknown command line flag 'nmu'. Did you mean: num ?\n")

  def two_lines():
    raise ValueError("first\n  second")

  assert _run_plain(two_lines, capsys) == "error: first second\n"

  def exists():
    raise FileExistsError("out is a file")

  assert _run_plain(exists, capsys) == "error: out is a file\n"
  monkeypatch.setenv("VLBPE_TRACEBACK", "1")
  with pytest.raises(ValueError, match="first"):
    cli.run_plain(two_lines)
