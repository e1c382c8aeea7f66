"""Greedy decoding constrained to a set of labels (V2L's few-shot classification).

  labels = prompts.label_ids(tok, classes)                # {label: ids}
  preds = classify(model, params, prompt_ids, labels, end_id=prompts.end_id(tok))

Each row's labels form a prefix trie over their token ids (plus `end_id` after each label when
given). At every step the LM's next-token logits are masked to the children of the row's trie
node and the arg-max child is taken (ties: the smallest id), as the public code's
`generate_fewshot` does with its `out_mask`, but exactly per prefix rather than per position.
The result is always one of the labels. This is greedy: it picks the best next token at each
step, which can differ from the label of highest total log-likelihood (a label whose first
token scores best may continue badly). Without `end_id` a label that is a proper prefix of
another cannot be told apart and raises.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vlbpe_jax.lm import generate as lm_generate
from vlbpe_jax.lm import model as lm_model

PAD_MULTIPLE = 64  # prompts are left-padded to a multiple of this (one compilation per width)


class LabelTrie:
  """Prefix trie of `{label: ids}`. Nodes are id tuples; `children(node)` -> sorted ids."""

  def __init__(self, labels, end_id=None):
    labels = {str(k): [int(i) for i in v] for k, v in dict(labels).items()}
    if not labels or any(not v for v in labels.values()):
      raise ValueError(f"labels={labels!r}: expected a non-empty dict of non-empty id lists")
    self.paths = {k: tuple(v) + (() if end_id is None else (int(end_id),))
                  for k, v in labels.items()}
    by_path = {}
    for k, p in self.paths.items():
      if p in by_path:
        raise ValueError(f"labels {by_path[p]!r} and {k!r} have the same ids {list(p)}")
      by_path[p] = k
    for k, p in self.paths.items():
      for j, q in self.paths.items():
        if k != j and len(p) < len(q) and q[:len(p)] == p:
          raise ValueError(f"label {k!r} ids {list(p)} are a prefix of {j!r} ids {list(q)}: "
                           "pass end_id")
    self._done = by_path
    self._kids = {}
    for p in self.paths.values():
      for t in range(len(p)):
        self._kids.setdefault(p[:t], set()).add(p[t])
    self.depth = max(len(p) for p in self.paths.values())

  def children(self, node) -> list[int]:
    return sorted(self._kids.get(tuple(node), ()))

  def label(self, node):
    """The label whose full path is `node`, else None."""
    return self._done.get(tuple(node))


def greedy(first_logits, step, tries) -> list[str]:
  """Constrained greedy decoding.

  first_logits: `[B, V]` next-token logits after each prompt; step(tokens `[B]` int32) ->
  `[B, V]` logits after feeding them; tries: B `LabelTrie`s. Returns B labels.
  """
  logits = np.asarray(first_logits, np.float32)
  if logits.ndim != 2 or logits.shape[0] != len(tries):
    raise ValueError(f"first_logits {logits.shape}: expected [{len(tries)}, V]")
  nodes = [() for _ in tries]
  out = [None] * len(tries)
  for t in range(max(tr.depth for tr in tries)):
    toks = np.zeros(len(tries), np.int32)
    for b, tr in enumerate(tries):
      if out[b] is not None:
        continue
      kids = np.asarray(tr.children(nodes[b]))
      if kids.max() >= logits.shape[1]:
        raise ValueError(f"label ids reach {kids.max()}: expected < vocab {logits.shape[1]}")
      toks[b] = kids[np.argmax(logits[b, kids])]  # first maximum = smallest id on ties
      nodes[b] = nodes[b] + (int(toks[b]),)
      out[b] = tr.label(nodes[b])
    if all(o is not None for o in out):
      break
    logits = np.asarray(step(toks), np.float32)
  return out


@functools.partial(jax.jit, static_argnames=("model",))
def _forward(model, params, ids, positions, segment_ids, cache):
  logits, cache = model.apply({"params": params}, ids, positions=positions,
                              segment_ids=segment_ids, cache=cache)
  return logits[:, -1], cache


def classify(model, params, prompts, labels, *, end_id=None) -> list[str]:
  """Constrained greedy labels of a batch of prompts with the LM's KV cache.

  prompts: B id lists (left-padded here, as lm/generate.py does); labels: one `{label: ids}`
  for all rows or a list of B (each row its own classes). Returns B labels.
  """
  if not prompts:
    raise ValueError("prompts: expected at least one prompt")
  label_sets = [labels] * len(prompts) if isinstance(labels, dict) else list(labels)
  if len(label_sets) != len(prompts):
    raise ValueError(f"{len(label_sets)} label sets for {len(prompts)} prompts: expected one "
                     "dict or one per prompt")
  tries = [LabelTrie(ls, end_id) for ls in label_sets]
  vocab = model.config.vocab_size
  if any(max(p) >= vocab for tr in tries for p in tr.paths.values()):
    raise ValueError(f"label or end ids reach the vocab size {vocab}")
  ids, mask = lm_generate.left_pad(prompts, multiple=PAD_MULTIPLE)
  if ids.max() >= vocab or ids.min() < 0:
    raise ValueError(f"prompt ids in [{ids.min()}, {ids.max()}]: expected [0, {vocab})")
  b, p = ids.shape
  depth = max(tr.depth for tr in tries)
  cache = lm_model.init_cache(model.config, b, p + -(-depth // 8) * 8)
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)  # [B, P]
  first, cache = _forward(model, params, ids, pos, mask.astype(np.int32), cache)
  state = {"cache": cache, "pos": pos[:, -1] + 1}

  def step(toks):
    logits, state["cache"] = _forward(model, params, jnp.asarray(toks)[:, None],
                                      jnp.asarray(state["pos"])[:, None],
                                      jnp.ones((b, 1), jnp.int32), state["cache"])
    state["pos"] = state["pos"] + 1
    return jax.device_get(logits)

  return greedy(jax.device_get(first), step, tries)
