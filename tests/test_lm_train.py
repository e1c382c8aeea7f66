"""LM training: staged runs on a 2x2x2 mesh, resume == uninterrupted, freezing, NaN stop."""

import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import lm_train_helpers as helpers
from vlbpe_jax import checkpoint
from vlbpe_jax import manifest
from vlbpe_jax import parallel
from vlbpe_jax.data import icl as icl_lib
from vlbpe_jax.lm import sequences
from vlbpe_jax.lm import train


NEW_ROWS = ("visual_embed", "visual_head", "new_text_embed", "new_text_head")


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lm"))
  config = helpers.make_config()
  tok = helpers.tokenizer(workdir)
  helpers.write_visual_files(workdir)
  visual, num_vq, num_bpe = sequences.load_visual_tokens(
      workdir, "bpe", vq_start=train.text_rows(config, tok))
  mesh = parallel.mesh_from_config(config.mesh)
  source = helpers.examples("train")
  text_params = train.pretrain_text(config, workdir, tok, source, mesh)
  trainer = train.Trainer(config, train.make_model(config, tok, num_vq, num_bpe), mesh)
  return dict(workdir=workdir, config=config, tok=tok, trainer=trainer, text=_host(text_params),
              text_params=text_params,
              make_iter=train.iterator_fn(config, tok, source, visual["train"]))


@pytest.fixture(scope="module")
def runs(setup):
  """The full plan uninterrupted (a) and stopped at steps 2 and 3, then resumed (b)."""
  s = setup
  plan = train.plan_of(s["config"], "full")
  go = lambda name, **kw: train.run_plan(  # noqa: E731
      s["config"], os.path.join(s["workdir"], name), s["trainer"], plan, s["make_iter"],
      base_params=s["text_params"], **kw)
  init = s["trainer"].init(jax.random.split(jax.random.key(0))[0], plan[0], s["text_params"])
  out = {"init": _host(init)}
  out["a"] = go("a")
  out["b2"] = _host(go("b", stop_at_step=2))  # end of stage 1: migration after the restore
  out["b3"] = _host(go("b", stop_at_step=3))  # mid stage 2
  out["b"] = go("b")
  return out


def test_plans():
  config = helpers.make_config()
  full, single = train.plan_of(config, "full"), train.plan_of(config, "single_stage")
  assert [p.stage for p in full] == [1, 2, 3]
  assert [p.steps for p in full] == [2, 2, 2]
  assert len(single) == 1 and single[0].stage == 3 and single[0].steps == 6
  assert single[0].tasks == ("caption", "attributes", "vqa", "dialogue", "vqa")
  assert train.plan_of(config, "text")[0].tasks == ("caption", "attributes", "vqa", "dialogue",
                                                    "icl", "denoise")  # no lm.text_tasks: all
  config.lm.text_tasks = ("vqa", "icl", "icl")
  assert train.plan_of(config, "text")[0].tasks == ("vqa", "icl", "icl")
  # lm.text_phases: V2L's LM continues stage 0 on them, each its own optimizer schedule.
  with pytest.raises(ValueError, match="text_phases is empty"):
    train.plan_of(config, "text_icl")
  config.lm.text_phases = ((5, ("induction",), 3e-3), (4, ("denoise",), 1e-3))
  icl = train.plan_of(config, "text_icl")
  assert [(p.stage, p.steps, p.tasks, p.lr) for p in icl] == [
      (3, 5, ("induction",), 3e-3), (3, 4, ("denoise",), 1e-3)]
  assert len({p.optimizer for p in icl}) == 2  # the schedule restarts per phase
  assert [p.seq_len for p in icl] == [0, 0]  # lm.seq_len's rows
  config.lm.text_phases = ((5, ("suffix_induction",), 1e-3, 192), (4, ("denoise",), 1e-3))
  icl = train.plan_of(config, "text_icl")
  assert [p.seq_len for p in icl] == [192, 0] and icl[0].optimizer == (3, 1e-3, 5)
  assert len(train.plan_of(config, "text")) == 1  # stage 0 itself (Being-VL's start) unchanged
  with pytest.raises(ValueError, match="run='two_stage'"):
    train.plan_of(config, "two_stage")


def test_plans_of_staging_alone_and_curriculum_alone():
  config = helpers.make_config()
  full, single = train.plan_of(config, "full"), train.plan_of(config, "single_stage")[0]
  staged = train.plan_of(config, "staged_no_curriculum")
  # full's stages, steps, LRs and per-stage schedules; every phase on single_stage's mix.
  assert staged == [dataclasses.replace(p, tasks=single.tasks) for p in full]
  assert [(p.stage, p.steps, p.lr) for p in staged] == [(1, 2, 3e-3), (2, 2, 2e-3), (3, 2, 1e-3)]
  curriculum = train.plan_of(config, "curriculum_no_staging")
  assert [p.stage for p in curriculum] == [3, 3, 3]
  assert [p.steps for p in curriculum] == [2, 2, 2]
  assert [p.tasks for p in curriculum] == [p.tasks for p in full]
  assert [p.lr for p in curriculum] == [2e-3] * 3
  # single_stage's optimizer (stage 3, its LR, one schedule over the 6 steps) in every phase.
  assert {p.optimizer for p in curriculum} == {single.optimizer} == {(3, 2e-3, 6)}
  assert len({p.optimizer for p in full}) == 3
  for bad in ("no_curriculum", "curriculum_no_staging "):
    with pytest.raises(ValueError, match="expected 'text' or one of.*curriculum_no_staging"):
      train.plan_of(config, bad)


def test_curriculum_no_staging_keeps_one_optimizer_across_its_phases(setup, tmp_path):
  """Its phases share one optimizer: the state crosses their boundaries whole (Adam moments and
  counts, the LR schedule's step: no re-warm-up), so on the same batches it ends where one
  stage-3 phase over all the steps does."""
  s = setup
  plan = train.plan_of(s["config"], "curriculum_no_staging")
  one = train.plan_of(s["config"], "single_stage")

  def same_batches():
    stream = s["make_iter"](one[0])
    return lambda phase: stream

  ends = [train.run_plan(s["config"], str(tmp_path / name), s["trainer"], p, same_batches(),
                         base_params=s["text_params"]) for name, p in (("a", plan), ("b", one))]
  a, b = _host(ends[0]), _host(ends[1])
  assert int(a["step"]) == 6
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_lm_seed_defaults_to_the_seed_and_is_checked():
  config = helpers.make_config()
  config.seed = 5
  assert train.lm_seed(config) == 5  # no lm.seed field: config.seed
  config.lm.seed = -1
  assert train.lm_seed(config) == 5
  config.lm.seed = 2
  assert train.lm_seed(config) == 2
  with pytest.raises(ValueError, match="lm.seed"):
    train.check_config(helpers.make_config(seed=-3))


@pytest.mark.parametrize("field,value,match", [
    ("stage_steps", (2, 2), "lm.stage_steps"),
    ("stage_steps", (2, 0, 2), "positive"),
    ("stage_tasks", (("caption",), ("ocr",), ("vqa",)), "ocr"),
    ("stage_tasks", (("caption",), ("icl",), ("vqa",)), "icl"),  # text-only: stage 0's
    ("stage_tasks", (("caption",), ("vqa",), ("denoise",)), "denoise"),
    ("text_tasks", ("caption", "ocr"), "lm.text_tasks"),
    ("text_tasks", (), "lm.text_tasks"),
    ("text_phases", ((0, ("denoise",), 1e-3),), "text_phases"),
    ("text_phases", ((5, ("ocr",), 1e-3),), "text_phases"),
    ("text_phases", ((5, (), 1e-3),), "text_phases"),
    ("text_phases", ((5, ("icl",)),), "text_phases"),
    ("text_phases", ((5, ("icl",), 1e-3, 1),), "text_phases"),  # a row of one token
    ("text_phases", ((5, ("icl",), 1e-3, 96.0),), "text_phases"),
    ("text_phases", ((5, ("icl",), 1e-3, 96, 0),), "text_phases"),
    ("batch_size", 0, "lm.batch_size"),
    ("first_frac", 1.5, "first_frac"),
    ("positions", "3d", "lm.positions"),
    ("vqa_questions", -1, "lm.vqa_questions"),
    ("denoise_palettes", (), "lm.denoise_palettes"),
    ("denoise_palettes", (-1,), "lm.denoise_palettes"),
    ("denoise_palettes", 2, "lm.denoise_palettes"),
    ("denoise_ns", (0,), "lm.denoise_ns"),
    ("denoise_shots", (1, 11), "lm.denoise_shots"),
    ("denoise_shots", (), "lm.denoise_shots"),
    ("vqa_questions", 1.5, "lm.vqa_questions"),
    ("vqa_branches", 1, "lm.vqa_branches"),
    ("vqa_branches", "yes", "lm.vqa_branches"),
])
def test_check_config_refuses_bad_values(field, value, match):
  with pytest.raises(ValueError, match=match):
    train.check_config(helpers.make_config(**{field: value}))


def test_icl_continuation_is_stage_0_run_on_and_leaves_it(setup):
  # pretrain_icl: V2L's LM = stage 0 continued on lm.text_phases in text_icl, equal to one
  # uninterrupted run of stage 0's phase and the text phases (Adam state carried); stage 0's
  # own checkpoint (Being-VL's start) is untouched, and a rerun restores the same params.
  s = setup
  config = helpers.make_config(text_phases=((2, ("induction",), 1e-3), (2, ("denoise",), 1e-3)))
  mesh = parallel.mesh_from_config(config.mesh)
  source = helpers.examples("train")
  icl = _host(train.pretrain_icl(config, s["workdir"], s["tok"], source, mesh))
  trainer = train.Trainer(config, train.make_model(config, s["tok"]), mesh)
  whole = train.run_plan(config, os.path.join(s["workdir"], "whole"), trainer,
                         train.plan_of(config, "text") + train.plan_of(config, "text_icl"),
                         train.iterator_fn(config, s["tok"], source, None))
  assert int(whole["step"]) == 6
  jax.tree.map(np.testing.assert_array_equal, icl, _host(whole["params"]))
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), icl, s["text"]))
  assert any(changed)
  again = _host(train.pretrain_icl(config, s["workdir"], s["tok"], source, mesh))
  jax.tree.map(np.testing.assert_array_equal, icl, again)
  text = _host(train.pretrain_text(config, s["workdir"], s["tok"], source, mesh))
  jax.tree.map(np.testing.assert_array_equal, text, s["text"])
  with pytest.raises(ValueError, match="no stage-0 text LM checkpoint"):
    train.pretrain_icl(config, os.path.join(s["workdir"], "empty"), s["tok"], source, mesh)
  # The denoise episodes' settings are part of what made text_icl: another value is refused.
  for field, value in (("denoise_palettes", (1,)), ("denoise_ns", (2, 16))):
    other = helpers.make_config(text_phases=config.lm.text_phases, **{field: value})
    assert train.denoise_settings(other) == {field[len("denoise_"):]: value}
    with pytest.raises(ValueError, match=field):
      train.pretrain_icl(other, s["workdir"], s["tok"], source, mesh)
  assert train.denoise_settings(config) == {}
  # Set to data/icl.TRAIN_DENOISE's own values (the demo's), ns and shots leave the checkpoint
  # and every key as they were before the fields existed (manifest.NEUTRAL_DEFAULTS).
  same = helpers.make_config(text_phases=config.lm.text_phases,
                             denoise_ns=icl_lib.TRAIN_DENOISE["ns"],
                             denoise_shots=icl_lib.TRAIN_DENOISE["shots"])
  jax.tree.map(np.testing.assert_array_equal, icl,
               _host(train.pretrain_icl(same, s["workdir"], s["tok"], source, mesh)))


def test_a_text_phase_trains_on_rows_of_its_own_length(setup, tmp_path):
  # A phase's own row length (lm.text_phases' 4th entry) for its batches and its tokens/s.
  s = setup
  config = helpers.make_config(text_phases=((2, ("induction",), 1e-3, 24),))
  assert config.lm.seq_len != 24
  phase = train.plan_of(config, "text_icl")[0]
  source = helpers.examples("train")
  batch = next(train.iterator_fn(config, s["tok"], source, None)(phase))
  assert batch["inputs"].shape == batch["targets"].shape == (config.lm.batch_size, 24)
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(train.text_dir(s["workdir"]), train.text_dir(str(tmp_path)))
  train.pretrain_icl(config, str(tmp_path), s["tok"], source,
                     parallel.mesh_from_config(config.mesh))
  with open(os.path.join(train.icl_dir(str(tmp_path)), "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert rows
  for r in rows:  # tokens/s x s/step = the phase's tokens per step and device
    assert r["perf/tokens_per_s_per_device"] * r["perf/step_time_s"] == pytest.approx(
        config.lm.batch_size * 24 / jax.device_count())


def test_resume_equals_uninterrupted_run(runs):
  a, b = _host(runs["a"]), _host(runs["b"])
  assert int(a["step"]) == int(b["step"]) == 6
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_metrics_log_each_step_once_with_its_stage(setup, runs):
  del runs
  logs = {}
  for name in ("a", "b"):
    with open(os.path.join(setup["workdir"], name, "metrics.jsonl")) as f:
      logs[name] = [json.loads(line) for line in f]
  assert [r["step"] for r in logs["b"]] == [1, 2, 3, 4, 5, 6]
  assert [r["stage"] for r in logs["a"]] == [1, 1, 2, 2, 3, 3]
  assert [r["train/loss"] for r in logs["a"]] == [r["train/loss"] for r in logs["b"]]
  assert all(math.isfinite(r["perf/tokens_per_s_per_device"]) for r in logs["a"])


def test_stage1_changes_only_the_new_rows(setup, runs):
  init, after = runs["init"]["params"], runs["b2"]["params"]
  for name in init:
    same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(init[name]),
                                                    jax.tree.leaves(after[name])))
    assert same == (name not in NEW_ROWS), name
  # The text rows are stage 0's weights, carried over bit for bit.
  np.testing.assert_array_equal(after["text_embed"], setup["text"]["text_embed"])


def test_stage1_trains_the_image_delimiters(setup, runs):
  """`<img>` `</img>` never occur in stage 0's text: stage 1 must train the embeddings the
  model reads for them (issue 12, defect 3), while every text row and layer stays put."""
  tok, model = setup["tok"], setup["trainer"].model
  init, after = runs["init"]["params"], runs["b2"]["params"]
  ids = np.array([[tok.image_begin_id, tok.image_end_id, tok.bos_id, tok.user_id]])
  before, moved = (np.asarray(model.apply({"params": p}, ids, method=type(model).embed))[0]
                   for p in (init, after))
  assert np.all(np.any(before[:2] != moved[:2], axis=-1))  # both delimiters trained
  np.testing.assert_array_equal(before[2:], moved[2:])  # text tokens read unchanged rows
  for name in init:
    if name not in NEW_ROWS:  # text tables, layers, final norm: bit-identical
      jax.tree.map(np.testing.assert_array_equal, init[name], after[name])


def test_stage2_changes_the_first_layer_only(runs):
  before, after = runs["b2"]["params"], runs["b3"]["params"]
  changed = {name for name in before
             if not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before[name]),
                                                             jax.tree.leaves(after[name])))}
  # depth 2, first_frac 0.25 -> ceil(0.5) = 1 layer; the new rows keep training.
  assert changed == {"layers_0", *NEW_ROWS}


@pytest.mark.parametrize("name", ["a", "b"])
def test_migration_carries_adam_counts_per_leaf(runs, name):
  """Trainer.migrate (in memory in run a, after restoring the stage-1 checkpoint in run b):
  leaves keep their Adam step counts across stages, newly trainable ones start at 0."""
  count = _host(runs[name]["opt"].inner_states["trainable"].inner_state[2][0].count)
  steps = lambda leaf: {int(c) for c in jax.tree.leaves(count[leaf])}  # noqa: E731
  # stages (2, 2, 2): the new rows trained 6 steps, layers_0 4 (stages 2, 3), layers_1 2.
  assert steps("visual_embed") == {6} and steps("layers_0") == {4}
  assert steps("new_text_embed") == {6} and steps("new_text_head") == {6}
  assert steps("layers_1") == {2} and steps("text_embed") == {2}

def test_state_is_sharded_by_logical_names(setup, runs):
  params = runs["a"]["params"]
  assert params["layers_0"]["mlp"]["up"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert params["text_embed"].sharding.spec == P("tensor", "fsdp")
  opt_sh = setup["trainer"].state_shardings(train.plan_of(setup["config"], "full")[1])["opt"]
  specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(
      opt_sh, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]}
  mu_up = [v for k, v in specs.items() if "mu" in k and "'up'" in k and "layers_0" in k]
  assert mu_up == [P("fsdp", "tensor")]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(setup):
  s = setup
  good = train.plan_of(s["config"], "full")[0]
  bad = train.Phase(1, 2, good.tasks, math.inf)  # inf learning rate: NaN updates at once
  run_dir = os.path.join(s["workdir"], "nan")
  with pytest.raises(FloatingPointError, match=r"non-finite .* at step 3 \(stage 1\).*"
                                               r"Last good checkpoint: step 2"):
    train.run_plan(s["config"], run_dir, s["trainer"], [good, bad], s["make_iter"],
                   base_params=s["text_params"])
  ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "ckpt"))
  assert ckpt.all_steps() == [2]
  state = ckpt.restore(s["trainer"].abstract_state(good))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_host(state["params"])))
  ckpt.close()


def test_vqa_questions_per_image_in_the_runs_not_in_stage_0(setup):
  """`lm.vqa_questions=1`: every VQA example of stages 1-3 asks one question about its image;
  stage 0 (text only) keeps all of an image's questions."""
  s = setup
  config = helpers.make_config(vqa_questions=1)
  source = helpers.examples("train")
  visual, _, _ = sequences.load_visual_tokens(s["workdir"], "bpe",
                                              vq_start=train.text_rows(config, s["tok"]))
  tok = s["tok"]

  def questions_per_example(make_iter):
    batch = next(make_iter(train.Phase(3, 1, ("vqa",), 1e-3)))
    counts = []
    for ids, seg in zip(batch["inputs"], batch["segment_ids"]):
      counts += [int((ids[seg == k] == tok.user_id).sum()) for k in set(seg.tolist()) - {0}]
    return counts

  one = questions_per_example(train.iterator_fn(config, tok, source, visual["train"]))
  assert one and set(one) == {1}
  every = questions_per_example(train.iterator_fn(s["config"], tok, source, visual["train"]))
  assert min(every) >= 4  # all of an image's questions (5-7; truncation may cut the last row's)
  text = questions_per_example(train.iterator_fn(config, tok, source, None))
  assert min(text) >= 4


def test_vqa_branches_in_the_runs_not_in_stage_0(setup, runs):
  """`lm.vqa_branches=True`: the runs' VQA rows carry branch ids (an image's questions as
  branches 1..k after it, positions restarting where the image ends); stage 0's text rows have
  none; a step on branched batches trains; splash is refused by name; the key is unchanged
  while the field is False (manifest.NEUTRAL_DEFAULTS)."""
  s = setup
  config = helpers.make_config(vqa_branches=True)
  source = helpers.examples("train")
  visual, _, _ = sequences.load_visual_tokens(s["workdir"], "bpe",
                                              vq_start=train.text_rows(config, s["tok"]))
  batch = next(train.iterator_fn(config, s["tok"], source, visual["train"])(
      train.Phase(3, 1, ("vqa",), 1e-3)))
  assert int(batch["branch_ids"].max()) >= 4
  for r in range(batch["inputs"].shape[0]):
    seg, br, pos = batch["segment_ids"][r], batch["branch_ids"][r], batch["positions"][r]
    for k in set(seg.tolist()) - {0}:
      at = np.flatnonzero(seg == k)
      prefix = int((br[at] == 0).sum())
      for b in set(br[at].tolist()) - {0}:
        part = at[br[at] == b]
        np.testing.assert_array_equal(pos[part], prefix + np.arange(len(part)))
  text = next(train.iterator_fn(config, s["tok"], source, None)(
      train.Phase(0, 1, ("vqa",), 1e-3)))
  assert "branch_ids" not in text
  # The full run's plan on branched batches, through the sharded step on the 8 devices.
  trainer = train.Trainer(config, s["trainer"].model, s["trainer"].mesh)
  out = _host(train.run_plan(config, os.path.join(s["workdir"], "branches"), trainer,
                             train.plan_of(config, "full"),
                             train.iterator_fn(config, s["tok"], source, visual["train"]),
                             base_params=s["text_params"]))
  assert int(out["step"]) == 6
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(out["params"]))
  assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), out["params"],
                                          _host(runs["a"])["params"])))
  splash = helpers.make_config(vqa_branches=True)
  splash.lm.model.attention_impl = "splash"
  with pytest.raises(ValueError, match="vqa_branches=True with lm.model.attention_impl='splash'"):
    train.check_config(splash)
  off = helpers.make_config(vqa_branches=False)
  assert manifest.config_dict(off)["lm"] == manifest.config_dict(s["config"])["lm"]
