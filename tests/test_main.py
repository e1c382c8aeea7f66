"""End to end: every config's tiny variant loads; the pipeline runs, reports, and resumes."""

import glob
import importlib.util
import json
import math
import os

import pytest

from vlbpe_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load_config(path, arg=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_tiny_variant_loads(path):
  full, tiny = load_config(path), load_config(path, "tiny")
  assert full.seed == tiny.seed
  assert train.parse_stages(tiny.stages)
  for section in ("vq", "lm"):
    if section in tiny and "total_steps" in tiny[section]:
      assert tiny[section].total_steps <= 3 < full[section].total_steps


@pytest.mark.parametrize("arg", ["long", "tiny"])
def test_vq_config_matches_the_vq_only_config(arg):
  # configs/vq_tiny.py (the VQ stage alone, its benchmark) must train the long demo's VQ-GAN;
  # the demo's own differs only in its schedule (fewer steps for its time budget).
  demo = load_config(os.path.join(ROOT, "configs", "tiny.py"), arg)
  alone = load_config(os.path.join(ROOT, "configs", "vq_tiny.py"),
                      "tiny" if arg == "tiny" else None)
  assert demo.vq.to_dict() == alone.vq.to_dict()


def test_demo_is_its_long_variant_with_fewer_steps():
  demo, long = (load_config(os.path.join(ROOT, "configs", "tiny.py"), a) for a in (None, "long"))
  demo, long = demo.to_dict(), long.to_dict()
  diff = {f"{s}.{k}" for s in demo if isinstance(demo[s], dict)
          for k in demo[s] if demo[s][k] != long[s][k]}
  diff |= {f"dit.decoder.{k}" for k in demo["dit"]["decoder"]
           if demo["dit"]["decoder"][k] != long["dit"]["decoder"][k]} - {"dit.decoder"}
  assert diff - {"dit.decoder"} == {
      "vq.total_steps", "vq.eval_every", "vq.ckpt_every", "vq.restart_until", "lm.text_steps",
      "lm.text_phases", "lm.stage_steps", "dit.total_steps", "v2l.total_steps", "v2l.fewshot_shots", "v2l.describe_queries", "v2l.restore_images"}
  assert {k for k in demo if not isinstance(demo[k], dict) and demo[k] != long[k]} == {
      "longer_run", "claims_record"}  # the records the demo's report shows
  assert demo["vq"]["total_steps"] < long["vq"]["total_steps"]
  with pytest.raises(ValueError, match="at most one of tiny and long"):
    load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny,long")


def test_unknown_config_arg_raises():
  with pytest.raises(ValueError, match="unknown"):
    load_config(os.path.join(ROOT, "configs", "tiny.py"), "nonsense")


def test_parse_stages_orders_and_validates():
  assert train.parse_stages("bpe,data") == ["data", "bpe"]
  with pytest.raises(ValueError, match="stages"):
    train.parse_stages("data,nope")


def tiny_pipeline_config():
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")
  # One LM run for CI time: the ablations run in tests/test_lm_train_stage.py.
  config.lm.runs = ("full",)
  return config


def tiny_pipeline(built_once):
  """(a copy of the tiny pipeline's workdir, its report's index.html), run on this process's 8
  devices once per test session (conftest.built_once): here and in tests/test_devices.py, which
  compares its metrics with runs on 6 and 1 devices."""
  workdir, built = built_once("tiny_pipeline", lambda w: {
      "index": os.path.relpath(train.train_and_evaluate(tiny_pipeline_config(), w), w)})
  return workdir, os.path.join(workdir, built["index"])


@pytest.mark.slow
def test_tiny_pipeline_runs_reports_and_resumes(built_once, tmp_path):
  config = tiny_pipeline_config()
  workdir, index = tiny_pipeline(built_once)
  assert os.path.exists(index)
  with open(os.path.join(workdir, "report", "metrics.json")) as f:
    metrics = json.load(f)
  for key in ("data.num_train", "tokenizer.vocab_size", "text.final_loss", "vq.psnr_db",
              "vq.codebook_usage",
              "bpe.compression", "lm.vqa_acc.full", "lm.vqa_acc.text_only",
              "lm.vqa_acc_heldout.full",
              "clip.zero_shot_shape_acc", "clip.best_caption_shape_acc",
              "dit.geneval.fm", "dit.geneval.mse",
              "dit.geneval.vq_latent", "dit.geneval_single.fm", "dit.diversity.fm",
              "dit.fid_clip.fm", "dit.geneval_upper_bound", "pixel_decoder.psnr_db",
              "dit.geneval_wrong_prompt.fm", "dit.geneval_upper_bound_wrong_prompt",
              "v2l.fewshot_acc.2way_1shot",
              "v2l.fewshot_text_only.5way_1shot", "v2l.chance.5way_1shot",
              "v2l.fewshot_acc_local.2way_1shot", "v2l.caption.recall", "v2l.vqa_acc",
              "v2l.vqa_acc_wrong_image", "v2l.recon_psnr_db.local_global",
              "v2l.restore_psnr_gain_db.inpaint"):
    assert key in metrics, key
  # The MSE design is deterministic given the prompt; flow matching samples differ.
  assert metrics["dit.diversity.mse"] == 0.0 < metrics["dit.diversity.fm"]
  assert math.isfinite(metrics["lm.embed_separation.full"])
  assert 1.0 <= metrics["vq.flat_codes_per_colour"] and 0.0 < metrics["vq.flat_top_share_min"]
  page = open(index).read()
  assert "Data: shapes scenes" in page and "<img" in page
  assert "lm/embeddings_full.png" in page
  assert os.path.exists(os.path.join(workdir, "report", "lm", "embeddings_full.png"))
  assert "dit/samples_fm.png" in page and "decoder(CLIP(real image))" in page
  assert "pixel_decoder/test.png" in page and "curves/pixel_decoder.png" in page
  # The sampling CLI on this workdir: PNGs per prompt and sample, at the trained resolution.
  from vlbpe_jax.dit import sample  # pylint: disable=g-import-not-at-top
  out = tmp_path / "samples"
  paths = sample.sample(workdir, ["a small red circle at the center.", "a blue star."],
                        str(out), num_samples=2, cfg=3.0, steps=2)
  assert [os.path.basename(p) for p in paths] == ["0000_0.png", "0000_1.png", "0001_0.png",
                                                  "0001_1.png"]
  from PIL import Image  # pylint: disable=g-import-not-at-top
  assert Image.open(paths[0]).size == (config.data.resolution,) * 2
  with pytest.raises(ValueError, match="longer than the prompt context"):
    sample.sample(workdir, ["a red circle " * 40], str(out))
  # V2L's codebooks name what they were built from: another frozen LM config is refused.
  from vlbpe_jax.v2l import train as v2l_train  # pylint: disable=g-import-not-at-top
  other = load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")
  other.lm.text_steps = 3
  with pytest.raises(ValueError, match="built from another tokenizer, LM"):
    v2l_train.load_context(other, workdir)
  # A second run finds every stage's work done and gives the same metrics.
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "report", "metrics.json")) as f:
    again = json.load(f)
  assert {k: v for k, v in again.items() if not k.startswith("perf.")} == {
      k: v for k, v in metrics.items() if not k.startswith("perf.")}
