"""V2L codebooks: local ids are LM ids, template-averaged CLIP embeddings, n-grams, top-k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlbpe_jax.clip import text as clip_text
from vlbpe_jax.v2l import codebook
import v2l_helpers


@pytest.fixture(scope="module")
def tok():
  return v2l_helpers.tokenizer()


def test_local_ids_are_lm_ids_that_decode_to_their_text(tok):
  lm_ids, texts = codebook.subword_texts(tok)
  assert lm_ids.dtype == np.int32 and len(lm_ids) == len(texts) > 10
  assert np.all(np.diff(lm_ids) > 0) and lm_ids.max() < tok.vocab_size
  for i, t in zip(lm_ids, texts):
    assert tok.decode([int(i)]) == t and t.strip()
    assert tok.piece_type(i) == "normal"
  kept = set(lm_ids.tolist())
  for role, i in tok.special_ids.items():
    assert i not in kept, role
  kinds = {tok.piece_type(i) for i in range(tok.vocab_size) if i not in kept}
  assert {"control", "byte", "unknown"} <= kinds  # 256 byte pieces, bos/eos/pad..., unk
  assert "red" in texts and "circle" in texts


def test_lm_to_local_table_and_entry_ids(tok):
  lm_ids, _ = codebook.subword_texts(tok)
  table = codebook.lm_to_local_table(lm_ids, tok.vocab_size)
  np.testing.assert_array_equal(table[lm_ids], np.arange(len(lm_ids)))
  assert table[tok.eos_id] == -1 and np.sum(table >= 0) == len(lm_ids)
  with pytest.raises(ValueError, match="repeat"):
    codebook.lm_to_local_table([5, 5], 10)
  with pytest.raises(ValueError, match=r"\[0, 10\)"):
    codebook.lm_to_local_table([3, 12], 10)
  arr = codebook.entry_id_array([codebook.Entry((4,), "a"), codebook.Entry((4, 5, 6), "b")])
  np.testing.assert_array_equal(arr, [[4, -1, -1], [4, 5, 6]])
  with pytest.raises(ValueError, match="expected 1..3"):
    codebook.entry_id_array([codebook.Entry((1, 2, 3, 4), "x")])


def test_embed_texts_normalises_each_template_then_averages(tok):
  model, params = v2l_helpers.clip()
  cfg = model.config
  enc = jax.jit(lambda ids: model.apply({"params": params}, ids, method="encode_text"))
  encode = v2l_helpers.encode
  texts, templates = ["red", "circle", "blue square"], ("a photo of a {}.", "the {} on the left")
  got = codebook.embed_texts(model, params, texts, encode, templates, batch_size=4)  # 2 calls
  assert got.shape == (3, cfg.embed_dim) and got.dtype == np.float32
  want = []
  for x in texts:
    ids = clip_text.tokenize([t.format(x) for t in templates], encode, cfg.context_len)
    e = np.asarray(enc(ids), np.float64)
    want.append(np.mean(e / np.linalg.norm(e, axis=-1, keepdims=True), axis=0))
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-6)
  assert np.all(np.linalg.norm(got, axis=-1) < 1 - 1e-4)  # the average is not re-normalised
  with pytest.raises(ValueError, match="templates"):
    codebook.embed_texts(model, params, texts, encode, ("no slot",))


def test_ngram_candidates_keep_lm_ids_and_dedupe(tok):
  red, circle, sq = (tok.encode(w)[-1] for w in (" red", " circle", " square"))
  assert tok.decode([red]).strip() == "red"
  lm_ids = np.asarray([red, circle, sq], np.int32)
  texts = [tok.decode([i]) for i in lm_ids]
  seen = []

  def lm_complete(prompts):  # a stand-in LM: greedy continuation ids per prompt
    seen.extend(prompts)
    table = {"red": [circle, sq], "circle": [tok.eos_id, red], "square": [red, red]}
    return [table[p.split("of ")[1].strip()] for p in prompts]

  entries = codebook.ngram_candidates(lm_complete, lm_ids, texts, tok.decode, batch_size=2)
  assert seen == [f"a photo of {t}" for t in texts]
  ids = [e.ids for e in entries]
  assert ids[:3] == [(red,), (circle,), (sq,)]  # unigrams first, in id order
  assert (red, circle) in ids and (red, circle, sq) in ids
  assert not any(i[0] == circle and len(i) > 1 for i in ids)  # eos ends the n-gram
  assert (sq, red) in ids and (sq, red, red) in ids
  for e in entries:
    assert tok.decode(list(e.ids)) == e.text
  assert len({e.text for e in entries}) == len(entries)
  dup = codebook.ngram_candidates(lambda p: [[red]] * len(p), [red, red], ["red", "red"],
                                  tok.decode)
  assert [e.ids for e in dup] == [(red,), (red, red)]  # equal texts kept once


def test_global_tokens_rank_by_cosine_and_filter_counts():
  entries = np.array([[1, 0, 0], [0, 10, 0], [0, 0, 1], [1, 1, 0]], np.float32)
  images = np.array([[1, 0.1, 0], [0.2, 1, 0], [1, 0, 0.05], [0, 0.1, 1]], np.float32)
  top = np.asarray(codebook.global_tokens(jnp.asarray(images), jnp.asarray(entries), 2))
  # Entry 1 is long (norm 10): a dot product would rank it first for image 0; cosine does not.
  np.testing.assert_array_equal(top, [[0, 3], [1, 3], [0, 3], [2, 1]])
  assert top.dtype == np.int32
  keep = codebook.filter_global(entries, images, top_k=1, min_images=1, batch_size=3)
  np.testing.assert_array_equal(keep, [0])  # top-1 of images 0 and 2: more than one image
  keep = codebook.filter_global(entries, images, top_k=2, min_images=1)
  np.testing.assert_array_equal(keep, [0, 1, 3])  # entry 1: images 1 and 3
  with pytest.raises(ValueError, match="k=5"):
    codebook.global_tokens(jnp.asarray(images), jnp.asarray(entries), 5)
  with pytest.raises(ValueError, match="width"):
    codebook.global_tokens(jnp.asarray(images[:, :2]), jnp.asarray(entries), 1)
