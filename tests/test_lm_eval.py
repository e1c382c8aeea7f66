"""Visual token files, prompts matching the training format, VQA/caption scoring, dialogues."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lm_train_helpers as helpers
from vlbpe_jax.data import pipeline
from vlbpe_jax.data import shapes
from vlbpe_jax.lm import evaluate
from vlbpe_jax.lm import sequences
from vlbpe_jax.lm import train


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lm_eval"))
  tok = helpers.tokenizer(workdir)
  codes, bpe = helpers.write_visual_files(workdir)
  return dict(workdir=workdir, tok=tok, codes=codes, bpe=bpe)


def test_visual_tokens_from_vq_and_bpe_files(files):
  vq, num_vq, num_bpe = sequences.load_visual_tokens(files["workdir"], "vq", vq_start=360)
  assert (num_vq, num_bpe) == (27, 0)
  ex = {"index": 5}
  np.testing.assert_array_equal(vq["test"](ex), files["codes"]["test"][5].reshape(-1) + 360)
  bpe, num_vq, num_bpe = sequences.load_visual_tokens(files["workdir"], "bpe", vq_start=360)
  assert (num_vq, num_bpe) == (27, files["bpe"].vocab_size - 27)
  ids = bpe["test"](ex)
  assert len(ids) < helpers.GRID ** 2  # merges shorten the sequence
  # Decoding the (shifted back) BPE tokens gives the code grid again.
  enc = files["bpe"].encode(files["codes"]["test"][5:6])
  np.testing.assert_array_equal(ids - 360, enc["tokens"][0, :enc["lengths"][0]])
  assert ids.max() < 360 + num_vq + num_bpe


def test_visual_token_errors(files, tmp_path):
  vq, _, _ = sequences.load_visual_tokens(files["workdir"], "vq", vq_start=360)
  with pytest.raises(ValueError, match="index 99"):
    vq["test"]({"index": 99})
  with pytest.raises(ValueError, match="'vq' stage"):
    sequences.load_visual_tokens(str(tmp_path), "bpe", vq_start=360)
  with pytest.raises(ValueError, match="kind='clip'"):
    sequences.load_visual_tokens(files["workdir"], "clip", vq_start=360)
  os.makedirs(tmp_path / "vq")
  with open(tmp_path / "vq" / "codes_meta.json", "w") as f:
    json.dump({"codebook_size": 16, "grid": [8, 8]}, f)
  os.makedirs(tmp_path / "bpe")
  with open(os.path.join(files["workdir"], "bpe", "bpe.json")) as src:
    (tmp_path / "bpe" / "bpe.json").write_text(src.read())
  with pytest.raises(ValueError, match="base_vocab_size=27"):
    sequences.load_visual_tokens(str(tmp_path), "bpe", vq_start=360)
  with pytest.raises(ValueError, match="lengths"):
    sequences.VisualTokens(np.zeros((2, 3)), np.array([1, 4]), 0)


def test_prompts_are_prefixes_of_the_training_format(files):
  tok = files["tok"]
  vis, _, _ = sequences.load_visual_tokens(files["workdir"], "bpe", vq_start=360)
  ex = helpers.examples("test", 1)[0]
  ids, mask = pipeline.format_example(ex, "vqa", tok, image_tokens=vis["test"])
  prompt = sequences.vqa_prompt(tok, vis["test"](ex), ex["qa"][0]["q"])
  assert ids[:len(prompt)].tolist() == prompt
  assert not mask[:len(prompt)].any() and mask[len(prompt)]  # the answer follows
  ids, _ = pipeline.format_example(ex, "caption", tok, image_tokens=vis["test"])
  prefix = sequences.image_prefix(tok, vis["test"](ex))
  assert ids[:len(prefix)].tolist() == prefix
  assert sequences.image_prefix(tok, None) == [tok.bos_id]


def test_every_question_type_is_trained_where_evaluation_asks_it(files):
  # Evaluation asks each question right after the image (sequences.vqa_prompt); training must
  # put every question there too, not only the first one shapes.questions emits.
  tok = files["tok"]
  vis, _, _ = sequences.load_visual_tokens(files["workdir"], "bpe", vq_start=360)
  ex = helpers.examples("test", 1)[0]
  first_seen = set()
  for seed in range(40):
    ids, mask = pipeline.format_example(ex, "vqa", tok, image_tokens=vis["test"],
                                        rng=np.random.default_rng(seed))
    for qa in ex["qa"]:
      prompt = sequences.vqa_prompt(tok, vis["test"](ex), qa["q"])
      if ids[:len(prompt)].tolist() == prompt:
        assert mask[len(prompt)] and not mask[:len(prompt)].any()
        first_seen.add(shapes.question_type(qa["q"]))
  assert first_seen == {shapes.question_type(qa["q"]) for qa in ex["qa"]}


# Hand-made scene: a held-out red star at the top-left, a seen blue square at the center.
RED_STAR = {"shape": "star", "color": "red", "size": "large", "position": "top-left"}
BLUE_SQUARE = {"shape": "square", "color": "blue", "size": "small", "position": "center"}
# (question, answer, held out?) as shapes.questions words them.
HAND_QA = [
    ("how many objects are there?", "2", False),  # reads no object's attributes
    ("what color is the square?", "blue", False),  # the other object of a held-out image
    ("what color is the star?", "red", True),  # about the red star
    ("what shape is at the top-left?", "star", True),
    ("what shape is at the center?", "square", False),
    ("what size is the red star?", "large", True),
    ("what size is the square at the center?", "small", False),
    ("where is the red star?", "top-left", True),
    ("where is the blue square?", "center", False),
    ("how many red objects are there?", "1", True),  # counts the red star
    ("how many blue objects are there?", "1", False),
    ("how many green objects are there?", "0", False),
    ("is there a red star?", "yes", True),
    ("is there a green triangle?", "no", True),  # names a held-out pair, absent
    ("is there a blue square?", "yes", False),
    ("is there a red square?", "no", False),  # seen pair, absent
]


def test_heldout_questions_are_those_about_a_heldout_composition():
  objects = [RED_STAR, BLUE_SQUARE]
  assert ("red", "star") in shapes.heldout_compositions()
  assert ("blue", "square") not in shapes.heldout_compositions()
  for q, _, held in HAND_QA:
    assert evaluate.heldout_question(q, objects) == held, q
  # An image without a held-out object: only a question naming a held-out pair counts.
  assert evaluate.heldout_question("is there a blue circle?", [BLUE_SQUARE])
  assert not evaluate.heldout_question("what color is the square?", [BLUE_SQUARE])
  with pytest.raises(ValueError, match="question"):
    evaluate.heldout_question("why is the sky blue?", objects)


def test_heldout_scores_count_only_heldout_questions():
  examples = [{"objects": [RED_STAR, BLUE_SQUARE]}, {"objects": [BLUE_SQUARE]}]
  rows = [(0, q, a, "wrong" if held else a) for q, a, held in HAND_QA]
  rows += [(1, "what color is the square?", "blue", "blue"),
           (1, "is there a blue circle?", "no", "no")]  # held out, right
  res = evaluate.heldout_scores(rows, examples)
  n = sum(h for _, _, h in HAND_QA) + 1
  assert res["num_heldout_questions"] == n
  assert res["vqa_acc_heldout"] == pytest.approx(1 / n)
  assert res["vqa_acc_heldout_se"] == pytest.approx(np.sqrt((1 / n) * (1 - 1 / n) / n))
  assert res["vqa_acc_seen"] == 1.0


def test_generated_questions_resolve_to_their_objects():
  """Every attribute question of shapes.questions is about exactly one object, existence ones
  about the objects present; held-out ones are a minority of the questions on images holding a
  held-out pair."""
  held = image_held = 0
  for i in range(200):
    ex = shapes.make_example(i, "test", seed=0, resolution=32)
    for qa in ex["qa"]:
      kind = shapes.question_type(qa["q"])
      objs = evaluate.question_objects(qa["q"], ex["objects"])
      if kind in ("color", "shape", "size", "position"):  # one object: the answer is its
        assert len(objs) == 1 and objs[0][kind] == qa["a"], qa  # attribute of that name
      if kind == "existence":
        assert bool(objs) == (qa["a"] == "yes"), qa
      h = evaluate.heldout_question(qa["q"], ex["objects"])
      held += h
      image_held += evaluate.has_heldout(ex["objects"])
      assert not h or evaluate.has_heldout(ex["objects"]) or kind == "existence"
  assert 0 < held < image_held / 2

def test_scoring_with_oracle_and_wrong_answers(files, monkeypatch):
  tok = files["tok"]
  vis, _, _ = sequences.load_visual_tokens(files["workdir"], "vq", vq_start=360)
  examples = helpers.examples("test")
  truth = {tuple(sequences.vqa_prompt(tok, vis["test"](ex), qa["q"])): qa["a"]
           for ex in examples for qa in ex["qa"]}
  captions = {tuple(sequences.image_prefix(tok, vis["test"](ex))): ex["caption"]
              for ex in examples}

  def oracle(model, params, tokenizer, prompts, **kw):
    del model, params, tokenizer, kw
    return [truth.get(tuple(p), captions.get(tuple(p))) for p in prompts]

  monkeypatch.setattr(evaluate, "generate_texts", oracle)
  res = evaluate.evaluate(None, None, tok, examples, vis["test"])
  held = [[evaluate.heldout_question(qa["q"], ex["objects"]) for qa in ex["qa"]]
          for ex in examples]
  assert 0 < sum(map(sum, held)) < sum(map(len, held))
  assert res["vqa_acc"] == res["vqa_acc_heldout"] == res["vqa_acc_seen"] == 1.0
  assert res["vqa_acc_heldout_se"] == 0.0
  assert res["num_questions"] == sum(len(ex["qa"]) for ex in examples)
  assert res["num_heldout_questions"] == sum(map(sum, held))
  assert res["caption_precision"] == res["caption_recall"] == 1.0
  assert res["vqa_acc_by_type"] and set(res["vqa_acc_by_type"].values()) == {1.0}

  # Wrong answers to held-out questions only.
  def half(model, params, tokenizer, prompts, **kw):
    out = oracle(model, params, tokenizer, prompts, **kw)
    held_prompts = {tuple(sequences.vqa_prompt(tok, vis["test"](ex), qa["q"]))
                    for ex, hs in zip(examples, held) for qa, h in zip(ex["qa"], hs) if h}
    return ["wrong" if tuple(p) in held_prompts else o for p, o in zip(prompts, out)]

  monkeypatch.setattr(evaluate, "generate_texts", half)
  res = evaluate.evaluate(None, None, tok, examples, vis["test"])
  assert res["vqa_acc_heldout"] == 0.0 and res["vqa_acc_seen"] == 1.0
  expected = 1 - res["num_heldout_questions"] / res["num_questions"]
  assert res["vqa_acc"] == pytest.approx(expected)

  # Wrong answers to one question type only.
  def no_color(model, params, tokenizer, prompts, **kw):
    out = oracle(model, params, tokenizer, prompts, **kw)
    color = {tuple(sequences.vqa_prompt(tok, vis["test"](ex), qa["q"]))
             for ex in examples for qa in ex["qa"] if qa["q"].startswith("what color")}
    return ["wrong" if tuple(p) in color else o for p, o in zip(prompts, out)]

  monkeypatch.setattr(evaluate, "generate_texts", no_color)
  by_type = evaluate.evaluate(None, None, tok, examples, vis["test"])["vqa_acc_by_type"]
  assert by_type.pop("color") == 0.0 and set(by_type.values()) == {1.0}
  monkeypatch.setattr(evaluate, "generate_texts", oracle)
  res = evaluate.evaluate(None, None, tok, examples, vis["test"])
  assert set(evaluate.accuracy_by_type(res["answers"], valid=True).values()) == {1.0}
  swapped = [(k, q, t, "red" if q.startswith("what color") else "yellow")
             for k, q, t, _ in res["answers"]]
  valid = evaluate.accuracy_by_type(swapped, valid=True)
  assert valid.pop("color") == 1.0 and set(valid.values()) == {0.0}


def test_wrong_image_control(files):
  vis, _, _ = sequences.load_visual_tokens(files["workdir"], "vq", vq_start=360)
  examples = helpers.examples("test")[:3]
  other = evaluate.OtherImage(vis["test"], examples)
  for k, ex in enumerate(examples):
    np.testing.assert_array_equal(other(ex), vis["test"](examples[(k + 1) % 3]))
  with pytest.raises(ValueError, match="at least 2"):
    evaluate.OtherImage(vis["test"], examples[:1])


def test_generation_runs_on_a_real_model(files):
  tok = files["tok"]
  config = helpers.make_config()
  vis, num_vq, num_bpe = sequences.load_visual_tokens(
      files["workdir"], "bpe", vq_start=train.text_rows(config, tok))
  model = train.make_model(config, tok, num_vq, num_bpe)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  examples = helpers.examples("test", 3)
  res = evaluate.evaluate(model, params, tok, examples, vis["test"], batch_size=4,
                          max_answer_tokens=3, max_caption_tokens=5)
  assert len(res["answers"]) == res["num_questions"] and len(res["captions"]) == 3
  # The scores are what the answer rows say (an untrained model may score 0, so not a range).
  assert res["vqa_acc"] == np.mean([t == a for _, _, t, a in res["answers"]])
  assert [(k, q, t) for k, q, t, _ in res["answers"]] == [
      (k, qa["q"], qa["a"]) for k, ex in enumerate(examples) for qa in ex["qa"]]
  chats = evaluate.dialogue(model, params, tok, examples, vis["test"], batch_size=4,
                            max_new_tokens=3)
  assert [len(c) for c in chats] == [len(ex["dialogue"]) // 2 for ex in examples]
  assert chats[0][0][:2] == (examples[0]["dialogue"][0]["value"],
                             examples[0]["dialogue"][1]["value"])
  with pytest.raises(ValueError, match="examples"):
    evaluate.evaluate(model, params, tok, [], vis["test"])
