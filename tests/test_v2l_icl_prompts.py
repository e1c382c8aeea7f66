"""Tests for vlbpe_jax/v2l/prompts.py: the few-shot layouts as LM ids, errors."""

import numpy as np
import pytest

from vlbpe_jax.data import icl
from vlbpe_jax.data.text_tokenizer import TextTokenizer
from vlbpe_jax.v2l import prompts


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = icl.episodes(np.random.default_rng(0), 300)
  return TextTokenizer.train(texts, vocab_size=320,
                             model_path=tmp_path_factory.mktemp("tok") / "t.model")


def _find(seq, sub):
  return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


def test_classification_text_layout_and_ids_match_the_text(tok):
  support = [("a b top", "circle"), ("c d", "star")]
  parts = prompts.classification_parts(support, "a b left", ["circle", "star"])
  text = prompts.prompt_text(parts)
  assert text == ("For each of the following input output pairs, output is one of "
                  "['circle' or 'star'] \n###\nInput: < a b top >\nOutput: circle "
                  "\n###\nInput: < c d >\nOutput: star \n###\nInput: < a b left >\nOutput:")
  ids = prompts.classification_prompt(tok, support, "a b left", ["circle", "star"])
  assert ids == tok.encode(text, add_bos=True)
  assert ids[0] == tok.bos_id


def test_image_ids_are_inserted_raw_and_query_is_last(tok):
  g1, g2, q = [[40, 41], [42]], np.array([50, 51, 52]), [[60, 61, 62], [63]]
  ids = prompts.classification_prompt(tok, [(g1, "red"), (g2, "blue")], q, ["red", "blue"])
  head, out = tok.encode("<"), tok.encode(prompts.EXAMPLE_OUT)
  for img in ([40, 41, 42], [50, 51, 52], [60, 61, 62, 63]):
    assert len(_find(ids, head + img + out)) == 1
  assert len(_find(ids, tok.encode(prompts.EXAMPLE_IN))) == 3
  assert ids[-len(out) - 4 - len(head):] == head + [60, 61, 62, 63] + out
  assert _find(ids, out + tok.encode("red"))  # support labels follow "Output:"
  no_instr = prompts.classification_prompt(tok, [(g1, "red")], q, ["red", "blue"],
                                           instruction=False)
  assert no_instr[1:len(tok.encode(prompts.EXAMPLE_IN)) + 1] == tok.encode(prompts.EXAMPLE_IN)


def test_caption_vqa_restoration_layouts(tok):
  cap = prompts.caption_parts([([7], "a red star.")], [8])
  assert cap == [prompts.EXAMPLE_IN, "<", [7], prompts.EXAMPLE_OUT, "a red star.",
                 prompts.EXAMPLE_IN, "<", [8], prompts.EXAMPLE_OUT]
  vqa = prompts.vqa_prompt(tok, [([7], "what color?", "red")], [8, 9], "what shape?")
  assert vqa[-len(tok.encode("Answer:")):] == tok.encode("Answer:")
  assert _find(vqa, tok.encode("<") + [8, 9] + tok.encode(">"))
  ex = [([1, 2, 3], [4, 5]), ([6, 7, 8], [9, 10])]
  parts = prompts.restoration_parts(ex, [11, 12, 13])
  assert parts[0] == "Learn a new language and predict the 2 tokens following the examples."
  assert parts[1:] == [prompts.EXAMPLE_IN, "<", [1, 2, 3], prompts.EXAMPLE_OUT, [4, 5],
                       prompts.EXAMPLE_IN, "<", [6, 7, 8], prompts.EXAMPLE_OUT, [9, 10],
                       prompts.EXAMPLE_IN, "<", [11, 12, 13], prompts.EXAMPLE_OUT]
  ids = prompts.restoration_prompt(tok, ex, [11, 12, 13])
  out = tok.encode(prompts.EXAMPLE_OUT)
  assert ids[-len(out) - 3:] == [11, 12, 13] + out


def test_label_ids_and_end_id(tok):
  labels = prompts.label_ids(tok, ["circle", "star"])
  assert labels == {"circle": tok.encode("circle"), "star": tok.encode("star")}
  assert prompts.end_id(tok) == tok.encode(prompts.EXAMPLE_IN)[0]


@pytest.mark.parametrize("kw, match", [
    (dict(support=[]), "support"),
    (dict(support=[([1], "cat")]), "label='cat'"),
    (dict(classes=["red", "red"]), "classes"),
    (dict(classes=[]), "classes"),
    (dict(query=[]), "input"),
    (dict(query=[10 ** 6]), "expected ids in"),
    (dict(query="  "), "non-empty string"),
])
def test_classification_errors(tok, kw, match):
  args = dict(support=[([1], "red")], query=[2], classes=["red", "blue"]) | kw
  with pytest.raises(ValueError, match=match):
    prompts.classification_prompt(tok, args["support"], args["query"], args["classes"])


def test_other_errors(tok):
  with pytest.raises(ValueError, match="lengths"):
    prompts.restoration_prompt(tok, [([1], [2, 3]), ([1], [2])], [1])
  with pytest.raises(ValueError, match="examples"):
    prompts.restoration_prompt(tok, [], [1])
  with pytest.raises(ValueError, match="question"):
    prompts.vqa_prompt(tok, [], [1], "")
  with pytest.raises(ValueError, match="token ids"):
    prompts.prompt_text(["a", [1]])
