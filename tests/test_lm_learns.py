"""The unified LM learns to read the image: a short run beats chance on questions that need the
image, and its wrong-image control (the same questions asked about another test image) does not.

The stand-in VQ (`lm_train_helpers.color_codes`: each 4x4 cell's colour on 27 levels) keeps
this small enough for CI; the demo shows the same with the trained VQ-GAN and visual BPE.
"""

import collections
import math

import pytest

import lm_train_helpers as helpers
from vlbpe_jax import parallel
from vlbpe_jax.data import shapes
from vlbpe_jax.data import stage as data_stage
from vlbpe_jax.data import tfds_builders
from vlbpe_jax.lm import evaluate
from vlbpe_jax.lm import sequences
from vlbpe_jax.lm import train

NUM = {"train": 600, "validation": 8, "test": 100}
# Count needs the image (the blind model: ~18%). Colour and position are read too, but too
# slowly for CI: after 2000 steps on 5000 images, colour 29% / position 40% against wrong-image
# 8% / 6% (BENCHMARKS.md, "Unified LM: what the model reads").
CHANCE = {"count": 1 / 4}  # 1-4 objects


@pytest.mark.slow
def test_a_short_run_reads_the_count_from_the_image(tmp_path):
  workdir = str(tmp_path)
  config = helpers.make_config(
      model=dict(width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=128, dtype="float32"),
      seq_len=256, batch_size=16, text_steps=60, stage_steps=(40, 40, 160),
      stage_lrs=(3e-3, 3e-3, 2e-3), warmup_steps=5,
      stage_tasks=(("attributes",), ("vqa", "attributes"), ("vqa",)), runs=("full",))
  config.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  config.data.num_train, config.data.num_test = NUM["train"], NUM["test"]
  data_stage.run_stage(config, workdir)
  helpers.write_visual_files(workdir, NUM)

  mesh = parallel.mesh_from_config(config.mesh)
  tok = data_stage.load_tokenizer(workdir)
  builder = data_stage.build_dataset(config, workdir)
  visual, num_vq, num_bpe = sequences.load_visual_tokens(
      workdir, "bpe", vq_start=train.text_rows(config, tok))
  text_params = train.pretrain_text(config, workdir, tok,
                                    tfds_builders.data_source(builder, "train"), mesh)
  model, trainer, state = train.train_run(
      config, workdir, "full", tok, tfds_builders.data_source(builder, "train"),
      visual["train"], num_vq, num_bpe, text_params, mesh)
  test = evaluate.first_examples(tfds_builders.data_source(builder, "test"), NUM["test"])
  kw = dict(batch_size=64, max_answer_tokens=4, captions=False)
  with trainer.ctx():
    right = evaluate.evaluate(model, state["params"], tok, test, visual["test"], **kw)
    wrong = evaluate.evaluate(model, state["params"], tok, test,
                              evaluate.OtherImage(visual["test"], test), **kw)
  right = evaluate.accuracy_by_type(right["answers"])
  wrong = evaluate.accuracy_by_type(wrong["answers"])
  n = collections.Counter(shapes.question_type(qa["q"]) for ex in test for qa in ex["qa"])
  for qtype, chance in CHANCE.items():
    se = math.sqrt(chance * (1 - chance) / n[qtype])
    assert right[qtype] > chance + 3 * se, (qtype, right, wrong, n)  # reads the image
    assert abs(wrong[qtype] - chance) < 0.1 + 2 * se, (qtype, right, wrong, n)  # ... only it
