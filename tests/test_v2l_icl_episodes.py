"""Tests for vlbpe_jax/data/icl.py: determinism, the classification prompt's layout, labels
consistent within an episode, loss masks, the text-only few-shot set."""

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


def test_deterministic_per_seed():
  a = icl.episodes(np.random.default_rng(3), 30)
  assert a == icl.episodes(np.random.default_rng(3), 30)
  assert a != icl.episodes(np.random.default_rng(4), 30)
  assert {t.split(" ")[0] for t in a} >= {"For", "\n###\nInput:"}  # several kinds
  assert icl.text_fewshot_tasks(5, 4, way=5) == icl.text_fewshot_tasks(5, 4, way=5)


def test_classification_episode_has_the_prompt_layout(tok):
  task = icl.classification_task(np.random.default_rng(0), way=3, shot=2, label_set="color")
  ep = icl.classification_episode(np.random.default_rng(0), way=3, shot=2, label_set="color")
  prompt = prompts.classification_prompt(tok, task["support"], task["query"], task["classes"])
  ids, mask = icl.episode_ids(tok, ep)
  answer = tok.encode(task["answer"])
  assert ids.tolist() == prompt + answer + [tok.eos_id]  # the visual prompt, then the label
  assert ids.tolist()[:-1] == tok.encode(ep.text, add_bos=True)
  assert ep.text.startswith(prompts.INSTRUCTION + " " + prompts.class_list(task["classes"]))


def test_labels_consistent_within_an_episode():
  rng = np.random.default_rng(1)
  for _ in range(20):
    t = icl.classification_task(rng, way=4, shot=3, label_set="shape", noise=0.0)
    assert len(t["classes"]) == 4 and set(t["classes"]) <= set(icl.LABEL_SETS["shape"])
    by_input = {}
    for x, label in t["support"]:
      assert by_input.setdefault(x, label) == label  # one input, one label
    assert len(by_input) == 4 and sorted(by_input.values()) == sorted(t["classes"])
    assert [lab for _, lab in t["support"]].count(t["answer"]) == 3
    assert by_input[t["query"]] == t["answer"]
    assert not set(" ".join(by_input).split()) & set(t["classes"])  # labels never inputs
  noisy = icl.classification_task(rng, way=2, shot=5, noise=0.5, input_len=8)
  assert len({x for x, _ in noisy["support"]}) > 2  # noisy instances differ


def test_loss_masks_and_copy_induction(tok):
  rng = np.random.default_rng(2)
  ep = icl.classification_episode(rng, way=2, shot=1)
  ids, mask = icl.episode_ids(tok, ep)
  labels = [p for p, t in zip(ep.parts, ep.targets) if t]
  assert len(labels) == 3 and ids.dtype == np.int32 and mask.dtype == np.bool_
  assert mask.sum() == sum(len(tok.encode(x)) for x in labels) + 1 and mask[-1]
  cp = icl.copy_episode(rng, shots=2)
  ins = [cp.parts[i + 1] for i, p in enumerate(cp.parts) if p == "<"]
  assert [p for p, t in zip(cp.parts, cp.targets) if t] == ins and len(ins) == 3
  ind = icl.induction_episode(rng)
  assert ind.parts[0] == ind.parts[1] and ind.targets == (False, True)


@pytest.mark.parametrize("kw, match", [
    (dict(label_set="animal"), "label_set"), (dict(way=1), "way=1"), (dict(way=9), "way=9"),
    (dict(noise=1.0), "noise=1.0"), (dict(symbols=("a",), input_len=1), "too few")])
def test_task_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    icl.classification_task(np.random.default_rng(0), **kw)


def test_kind_errors():
  with pytest.raises(ValueError, match="kinds"):
    icl.sample_episode(np.random.default_rng(0), kinds=("sort",))
