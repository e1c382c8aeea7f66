"""The `lm` pipeline stage end to end on a tiny tfds dataset: ablation runs, report, resume."""

import json
import math
import os

import pytest

import lm_train_helpers as helpers
from vlbpe_jax.data import stage as data_stage
from vlbpe_jax.data import tfds_builders
from vlbpe_jax.eval import report
from vlbpe_jax.lm import sequences
from vlbpe_jax.lm import stage as lm_stage
from vlbpe_jax.lm import train


@pytest.mark.slow
def test_lm_stage_runs_ablations_reports_and_skips_finished_runs(tmp_path):
  workdir = str(tmp_path)
  config = helpers.make_config(num_eval=8, report_examples=2)
  data_stage.run_stage(config, workdir)
  helpers.write_visual_files(workdir)
  metrics = lm_stage.run_stage(config, workdir)
  for run in ("full", "no_bpe", "single_stage"):  # each score is what its answers say
    with open(os.path.join(workdir, "lm", run, "result.json")) as f:
      stored = json.load(f)
    assert metrics[f"lm.vqa_acc.{run}"] == pytest.approx(
        sum(t == a for _, _, t, a in stored["answers"]) / len(stored["answers"]))
    assert metrics[f"lm.vqa_acc_wrong_image.{run}"] == pytest.approx(
        sum(t == a for _, _, t, a in stored["wrong_image"]["answers"]) / len(stored["answers"]))
  assert "lm.vqa_acc_heldout.full" in metrics and "lm.vqa_acc.text_only" in metrics
  assert metrics["lm.vqa_acc_heldout_se.full"] >= 0.0
  assert (metrics["lm.trainable_params.stage1"] < metrics["lm.trainable_params.stage2"]
          < metrics["lm.trainable_params.stage3"])
  assert metrics["lm.visual_tokens_per_image.full"] < metrics["lm.visual_tokens_per_image.no_bpe"]
  saved = report.read_metrics(workdir)
  assert all(saved[k] == v for k, v in metrics.items())
  with open(os.path.join(workdir, "report", "sections", "lm.json")) as f:
    section = json.load(f)
  assert section["order"] == 40 and "BPE &gt; no BPE" in section["html"]
  assert "full, wrong image" in section["html"] and "answers from the image" in section["html"]
  assert "question type's format" in section["html"]
  assert "of them about a held-out composition" in section["html"]
  assert "lm.vqa_acc_by_type.text_only.count" in metrics
  assert os.path.exists(os.path.join(workdir, "report", "lm", "example_0.png"))
  for run in ("full", "no_bpe", "single_stage"):
    assert math.isfinite(metrics[f"lm.embed_separation.{run}"])
    assert metrics[f"lm.embed_separation.{run}"] > 0.0
    assert metrics[f"lm.embed_separation_shuffled.{run}"] > 0.0
    assert 0.0 < metrics[f"lm.embed_separation_p.{run}"] <= 1.0
    assert f"embeddings_{run}.png" in section["html"]
    assert os.path.exists(os.path.join(workdir, "report", "lm", f"embeddings_{run}.png"))
  assert "embedding separation" in section["html"]
  with open(os.path.join(workdir, "lm", "full", "result.json")) as f:
    emb = json.load(f)["embeddings"]
  tok = data_stage.load_tokenizer(workdir)
  # Byte-fallback pieces never occur in the shapes texts: their (untrained) rows are left out.
  assert 0 < emb["num_text"] < tok.vocab_size - 256
  assert 0 < emb["num_visual"] <= 27 + helpers.NUM_MERGES

  # Finished runs are skipped: same numbers, result files untouched.
  path = os.path.join(workdir, "lm", "full", "result.json")
  mtime = os.path.getmtime(path)
  assert lm_stage.run_stage(config, workdir) == metrics
  assert os.path.getmtime(path) == mtime
  with pytest.raises(ValueError, match="another config"):
    lm_stage.run_stage(helpers.make_config(num_eval=4), workdir)

  # A result stored before the wrong-image control and the embedding summary existed gets them
  # from the finished run; the figure is drawn again from the result.
  with open(path) as f:
    stored = json.load(f)
  with open(path, "w") as f:
    json.dump({k: v for k, v in stored.items() if k not in ("wrong_image", "embeddings")}, f)
  os.remove(os.path.join(workdir, "report", "lm", "embeddings_full.png"))
  assert lm_stage.run_stage(config, workdir) == metrics
  with open(path) as f:
    assert json.load(f) == stored
  assert os.path.exists(os.path.join(workdir, "report", "lm", "embeddings_full.png"))

  # The CLI's function resumes the finished checkpoint and evaluates it the same way.
  res = train.train_and_evaluate(config, workdir, "no_bpe")
  assert res["vqa_acc"] == metrics["lm.vqa_acc.no_bpe"]


@pytest.mark.slow
def test_2d_positions_train_evaluate_and_refuse_a_1d_resume(tmp_path):
  workdir = str(tmp_path)
  config = helpers.make_config(positions="2d", num_eval=4)
  data_stage.run_stage(config, workdir)
  _, bpe = helpers.write_visual_files(workdir)
  tok = data_stage.load_tokenizer(workdir)
  visual, _, _ = sequences.load_visual_tokens(workdir, "bpe",
                                              vq_start=train.text_rows(config, tok))
  source = tfds_builders.data_source(data_stage.build_dataset(config, workdir), "train")
  phase = train.plan_of(config, "full")[0]
  batch = next(train.iterator_fn(config, tok, source, visual["train"])(phase))
  assert batch["positions"].shape == (8, 160, 2)
  image = batch["inputs"] >= train.text_rows(config, tok)
  rows, cols = batch["positions"][..., 0], batch["positions"][..., 1]
  assert (rows[~image] == cols[~image]).all()  # text on the diagonal
  assert (rows[image] != cols[image]).any()  # image tokens off it
  config.lm.data_shards = 3
  with pytest.raises(ValueError, match=r"lm.batch_size=8 does not split over 3 data shards "
                     r"\(lm.data_shards=3\)"):
    train.iterator_fn(config, tok, source, visual["train"])(phase)
  config.lm.data_shards = 0
  res = train.train_and_evaluate(config, workdir, "full")
  assert 0.0 <= res["vqa_acc"] <= 1.0 and res["num_questions"] > 0
  with pytest.raises(ValueError, match="lm.positions"):
    train.train_and_evaluate(helpers.make_config(num_eval=4), workdir, "full")


def test_results_are_keyed_by_the_lm_seed_and_older_ones_still_load(tmp_path):
  config = helpers.make_config()
  path = str(tmp_path / "result.json")
  key = lm_stage._fingerprint(config, "full")  # pylint: disable=protected-access
  assert key["lm.seed"] == "<missing>"  # lm.seed -1 (or absent): config.seed, as before
  older = {k: v for k, v in key.items() if k != "lm.seed"}  # stored before lm.seed existed
  with open(path, "w") as f:
    json.dump({"vqa_acc": 0.5, "config": older}, f)
  assert lm_stage._load(path, config, "full")["vqa_acc"] == 0.5  # pylint: disable=protected-access
  seeded = helpers.make_config(seed=3)
  assert lm_stage._fingerprint(seeded, "full")["lm.seed"] == 3  # pylint: disable=protected-access
  assert lm_stage._fingerprint(seeded, "text")["lm.seed"] == 3  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="lm.seed"):
    lm_stage._load(path, seeded, "full")  # pylint: disable=protected-access


def test_unknown_runs_are_refused_before_any_work(tmp_path):
  with pytest.raises(ValueError, match="lm.runs=.*expected a non-empty subset of.*"
                                       "curriculum_no_staging"):
    lm_stage.run_stage(helpers.make_config(runs=("full", "staged")), str(tmp_path))
  assert not os.listdir(tmp_path)
