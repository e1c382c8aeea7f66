"""Tests for vlbpe_jax/v2l/constrained.py: the label trie, the constrained arg-max path, and
that a random LM decoding with its KV cache can only produce the given labels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlbpe_jax.lm import model as lm_model
from vlbpe_jax.v2l import constrained

V = 12


def _logits(best):
  """[V] logits ranking the ids of `best` first, in order."""
  row = np.zeros(V, np.float32)
  for rank, i in enumerate(best):
    row[i] = 10.0 - rank
  return row


def test_fake_logits_pick_the_constrained_argmax_path():
  labels = {"a": [5, 6], "b": [5, 7], "c": [8]}
  trie = constrained.LabelTrie(labels)
  assert trie.children(()) == [5, 8] and trie.children((5,)) == [6, 7] and trie.depth == 2
  fed = []

  def step(toks):
    fed.append(toks.tolist())
    return np.stack([_logits([9, 7, 6])])  # 9 is best but not allowed

  first = np.stack([_logits([9, 5, 8])])
  assert constrained.greedy(first, step, [trie]) == ["b"]
  assert fed == [[5]]
  # Greedy, not max total likelihood: 5 wins the first step although its continuations are
  # terrible; "c" would have the higher total log-probability.
  first = np.stack([np.where(np.arange(V) == 5, 3.0, np.where(np.arange(V) == 8, 2.9, 0.0))])
  poor = lambda toks: np.stack([np.where(np.arange(V) == 0, 50.0, 0.0)])
  assert constrained.greedy(first, poor, [trie]) == ["a"]  # tie of 6 and 7: smaller id


def test_end_id_separates_a_label_that_is_a_prefix_of_another():
  labels = {"red": [5], "reddish": [5, 6]}
  with pytest.raises(ValueError, match="prefix"):
    constrained.LabelTrie(labels)
  trie = constrained.LabelTrie(labels, end_id=2)
  first = np.stack([_logits([5])] * 2)
  steps = iter([np.stack([_logits([2, 6]), _logits([6, 2])]), np.stack([_logits([2])] * 2)])
  assert constrained.greedy(first, lambda t: next(steps), [trie, trie]) == ["red", "reddish"]


@pytest.mark.parametrize("labels, match", [
    ({}, "non-empty"), ({"a": []}, "non-empty"), ({"a": [1], "b": [1]}, "same ids")])
def test_trie_errors(labels, match):
  with pytest.raises(ValueError, match=match):
    constrained.LabelTrie(labels)


def _lm():
  """A random 1-block LM; params drawn on the host (no init compile)."""
  cfg = lm_model.lm_config("mu", text_vocab=40, num_special=2, num_vq=6, dtype="float32",
                           depth=1)
  model = lm_model.LM(cfg)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(s.dtype), shapes)
  return model, params["params"]


def _reference(fwd, prompt, labels, end_id):
  """Cache-free constrained greedy: a full forward per step (right-padded to 16: causal)."""
  trie, node = constrained.LabelTrie(labels, end_id), ()
  while trie.label(node) is None:
    seq = list(prompt) + list(node)
    logits = np.asarray(fwd(jnp.array([seq + [0] * (16 - len(seq))])))
    kids = trie.children(node)
    node = node + (kids[int(np.argmax(logits[0, len(seq) - 1, kids]))],)
  return trie.label(node)


def test_random_lm_only_ever_produces_labels_and_matches_a_cache_free_loop():
  model, params = _lm()
  rng = np.random.default_rng(0)
  prompts, label_sets = [], []
  for _ in range(16):
    prompts.append(rng.integers(0, 48, size=int(rng.integers(1, 12))).tolist())
    ids = rng.permutation(40)[:5]  # distinct first ids per label, some two-token labels
    label_sets.append({f"L{j}": [int(ids[j])] + ([int(ids[4])] if j % 2 else [])
                       for j in range(4)})
  preds = constrained.classify(model, params, prompts, label_sets, end_id=47)
  assert all(p in ls for p, ls in zip(preds, label_sets))
  assert len(set(preds)) >= 3  # not one label everywhere (two-token labels among them)
  fwd = jax.jit(lambda ids: model.apply({"params": params}, ids))
  for i in (0, 5, 11):
    assert preds[i] == _reference(fwd, prompts[i], label_sets[i], 47)
  shared = constrained.classify(model, params, prompts, {"x": [3, 9], "y": [4, 5]}, end_id=47)
  assert set(shared) <= {"x", "y"}


def test_classify_errors():
  model, params = _lm()
  with pytest.raises(ValueError, match="label sets"):
    constrained.classify(model, params, [[1], [2]], [{"a": [1]}])
  with pytest.raises(ValueError, match="vocab size"):
    constrained.classify(model, params, [[1]], {"a": [100]})
  with pytest.raises(ValueError, match="prompt ids"):
    constrained.classify(model, params, [[100]], {"a": [1]})
