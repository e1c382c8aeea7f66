"""V2L codebooks built from the frozen LM's vocabulary and the frozen CLIP text tower.

  lm_ids, texts = subword_texts(tok)                         # local vocabulary: real LM ids
  local_emb = embed_texts(clip, clip_params, texts, encode)  # [V, E], frozen
  entries = ngram_candidates(lm_complete, lm_ids, texts, tok.decode)
  entry_emb = embed_texts(clip, clip_params, [e.text for e in entries], encode)  # [G, E]
  keep = filter_global(entry_emb, image_emb, top_k=5, min_images=100)
  tokens = global_tokens(image_emb, entry_emb[keep], k=21)    # [N, 21] entry indices

Local vocabulary (`subword_texts`): every id of the LM's sentencepiece model whose piece is an
ordinary ("normal") piece and whose decoded text is not blank. Control pieces (bos, eos, pad,
image and role markers), the unknown piece, unused pieces and byte-fallback pieces `<0xNN>` can
never be a visual word: they have no text of their own (a lone byte is not valid UTF-8 text).
A piece that decodes to whitespace only (`▁`) is dropped too: "a photo of a ." says nothing.
Each kept index i of the local codebook is the LM id `lm_ids[i]`, and `tok.decode([lm_ids[i]])`
is exactly `texts[i]`: the public code also embeds `tokenizer.decode(i)`.

Global codebook (`ngram_candidates`): the public code completes "a photo of {subword}" greedily
with the LM, one token at a time, twice, and keeps subword, subword+1 and subword+2 tokens (so
"words" there are LM tokens). Here `lm_complete` returns the greedy continuation ids of each
prompt in one call (greedy decoding of two tokens is the same two one-token steps), and every
entry keeps its 1-3 LM ids: the LM is later fed these ids, not a re-tokenisation of the text.

Embeddings (`embed_texts`): each text in every prompt template through the CLIP text tower,
each template's embedding L2-normalised, then averaged over the templates (the average itself is
not re-normalised, as in the public code's step2). The public code uses 80 ImageNet templates;
`DEFAULT_TEMPLATES` is a small subset of them.

Similarities: the public code ranks global entries by a dot product (filtering) and by squared
L2 (an image's tokens) between the unit image embedding and the un-normalised averaged entries.
Here both use the cosine (entries normalised): the average's length only measures how much its
templates agree, which should not decide which words describe an image.
"""

from collections.abc import Callable, Sequence
import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vlbpe_jax.clip import text as clip_text

DEFAULT_TEMPLATES = ("a photo of a {}.", "a bad photo of a {}.", "a drawing of a {}.",
                     "a close-up photo of the {}.", "a painting of the {}.", "itap of a {}.")
NGRAM_PROMPT = "a photo of {}"


class Entry(NamedTuple):
  """A global codebook entry: its 1-3 LM ids and their decoded text."""
  ids: tuple[int, ...]
  text: str


def subword_texts(tokenizer) -> tuple[np.ndarray, list[str]]:
  """The local vocabulary: (lm_ids int32 [V], texts) in LM id order (rule in the module doc)."""
  ids, texts = [], []
  for i in range(tokenizer.vocab_size):
    if tokenizer.piece_type(i) != "normal":
      continue
    text = tokenizer.decode([i])
    if text.strip():
      ids.append(i)
      texts.append(text)
  if not ids:
    raise ValueError(f"tokenizer with {tokenizer.vocab_size} pieces has no text pieces")
  return np.asarray(ids, np.int32), texts


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _embed_chunk(clip_model, num_templates, clip_params, ids):
  """ids: [n * T, L] -> [n, E]: per-template unit embeddings averaged over the T templates."""
  emb = clip_model.apply({"params": clip_params}, ids, method="encode_text")  # [n*T, E]
  emb = _normalize(emb.astype(jnp.float32)).reshape(-1, num_templates, emb.shape[-1])
  return jnp.mean(emb, axis=1)  # [n, E]


def embed_texts(clip_model, clip_params, texts: Sequence[str], encode: Callable[[str], list[int]],
                templates: Sequence[str] = DEFAULT_TEMPLATES, context_len: int | None = None,
                batch_size: int = 256) -> np.ndarray:
  """CLIP text embeddings of `texts` averaged over `templates` -> float32 [N, E] (host).

  encode: the CLIP tower's text -> ids (e.g. `lambda s: tok.encode(s, add_eos=True)`);
  context_len: defaults to the model's; batch_size: prompts per jitted call (all calls have the
  same shape: the last chunk is padded with copies of its last row, then dropped).
  """
  templates = tuple(templates)
  if not templates or any("{}" not in t for t in templates):
    raise ValueError(f"templates={templates!r}: expected non-empty strings with a '{{}}'")
  if not texts:
    raise ValueError("texts: expected at least one text")
  context_len = context_len or clip_model.config.context_len
  per_call = max(1, batch_size // len(templates))  # texts per call
  out = []
  for start in range(0, len(texts), per_call):
    chunk = list(texts[start:start + per_call])
    n = len(chunk)
    chunk += [chunk[-1]] * (per_call - n)
    prompts = [t.format(x) for x in chunk for t in templates]  # text-major: [n * T]
    ids = clip_text.tokenize(prompts, encode, context_len)
    out.append(np.asarray(_embed_chunk(clip_model, len(templates), clip_params, ids))[:n])
  return np.concatenate(out)


def ngram_candidates(lm_complete: Callable[[list[str]], Sequence[Sequence[int]]],
                     lm_ids: Sequence[int], texts: Sequence[str],
                     decode: Callable[[Sequence[int]], str], *, prompt: str = NGRAM_PROMPT,
                     max_extra: int = 2, batch_size: int = 256) -> list[Entry]:
  """Subwords plus their bigrams and trigrams from the frozen LM's greedy completion.

  lm_complete(prompts) -> for each prompt, the LM's greedy continuation ids (>= max_extra of
  them, fewer if it stopped); lm_ids, texts: the local vocabulary (`subword_texts`); decode: the
  LM tokenizer's ids -> text. An n-gram ends at the first continuation id outside `lm_ids`
  (eos, control, byte pieces). Entries are deduplicated by their decoded text (equal texts get
  equal CLIP embeddings and would take two of an image's top-k slots), first kept: all
  unigrams in id order, then the longer n-grams.
  """
  if len(lm_ids) != len(texts):
    raise ValueError(f"lm_ids ({len(lm_ids)}) and texts ({len(texts)}) differ in length")
  if "{}" not in prompt:
    raise ValueError(f"prompt={prompt!r}: expected a '{{}}' for the subword")
  allowed = {int(i) for i in lm_ids}
  grams = [[(int(i),)] for i in lm_ids]  # per subword: its n-grams, shortest first
  for start in range(0, len(texts), batch_size):
    prompts = [prompt.format(t) for t in texts[start:start + batch_size]]
    completions = lm_complete(prompts)
    if len(completions) != len(prompts):
      raise ValueError(f"lm_complete returned {len(completions)} completions for "
                       f"{len(prompts)} prompts")
    for j, extra in enumerate(completions):
      ids = grams[start + j][0]
      for tok in list(extra)[:max_extra]:
        if int(tok) not in allowed:
          break
        ids = ids + (int(tok),)
        grams[start + j].append(ids)
  entries, seen = [], set()
  for n in range(max_extra + 1):
    for g in grams:
      if len(g) > n:
        text = decode(g[n])
        if text.strip() and text not in seen:
          seen.add(text)
          entries.append(Entry(g[n], text))
  return entries


def entry_id_array(entries: Sequence[Entry], width: int = 3) -> np.ndarray:
  """Entries' LM ids as int32 [G, width], padded with -1 (the lead's prompts strip it)."""
  out = np.full((len(entries), width), -1, np.int32)
  for g, e in enumerate(entries):
    if not 1 <= len(e.ids) <= width:
      raise ValueError(f"entry {e!r} has {len(e.ids)} ids; expected 1..{width}")
    out[g, :len(e.ids)] = e.ids
  return out


def cosine(a, b):
  """a: [N, E], b: [G, E] -> [N, G] cosine similarities (float32)."""
  return _normalize(a.astype(jnp.float32)) @ _normalize(b.astype(jnp.float32)).T


def global_tokens(image_emb, entry_emb, k: int = 21):
  """image_emb [N, E], entry_emb [G, E] -> int32 [N, k]: the k entries of highest cosine,
  most similar first."""
  chex.assert_rank([image_emb, entry_emb], 2)
  if image_emb.shape[1] != entry_emb.shape[1]:
    raise ValueError(f"image_emb width {image_emb.shape[1]} != entry_emb width "
                     f"{entry_emb.shape[1]}: both must be CLIP's joint embedding")
  if not 1 <= k <= entry_emb.shape[0]:
    raise ValueError(f"k={k}: expected 1..{entry_emb.shape[0]} (the global entries)")
  return jax.lax.top_k(cosine(image_emb, entry_emb), k)[1].astype(jnp.int32)


def filter_global(entry_emb, image_emb, top_k: int = 5, min_images: int = 100,
                  batch_size: int = 1024) -> np.ndarray:
  """Indices (int64, ascending) of the entries in the top-`top_k` of MORE than `min_images`
  images (the public code: top-5, > 100 ImageNet training images). Host loop over image
  batches; entry_emb [G, E], image_emb [N, E]."""
  if min_images < 0:
    raise ValueError(f"min_images={min_images}: expected >= 0")
  counts = np.zeros((entry_emb.shape[0],), np.int64)
  for start in range(0, image_emb.shape[0], batch_size):
    top = np.asarray(global_tokens(jnp.asarray(image_emb[start:start + batch_size]),
                                   jnp.asarray(entry_emb), top_k))
    counts += np.bincount(top.reshape(-1), minlength=counts.shape[0])
  return np.flatnonzero(counts > min_images)


def lm_to_local_table(lm_ids, lm_vocab_size: int) -> np.ndarray:
  """int32 [lm_vocab_size]: the local codebook index of each LM id, -1 where the id is not a
  local token (control, byte, ... pieces). `table[lm_ids[i]] == i`; jnp.take it under jit."""
  lm_ids = np.asarray(lm_ids)
  if lm_ids.size and (lm_ids.min() < 0 or lm_ids.max() >= lm_vocab_size):
    raise ValueError(f"lm_ids span [{lm_ids.min()}, {lm_ids.max()}]: expected ids in "
                     f"[0, {lm_vocab_size})")
  if len(np.unique(lm_ids)) != len(lm_ids):
    raise ValueError("lm_ids repeat an id: a local codebook lists each LM id once")
  table = np.full((lm_vocab_size,), -1, np.int32)
  table[lm_ids] = np.arange(len(lm_ids), dtype=np.int32)
  return table
