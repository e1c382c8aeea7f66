"""BLIP3-o's conditioning: a frozen autoregressive backbone reads `[prompt; Q learnable queries]`.

  ids, mask = encode_prompts(tok.encode, captions, template=TEMPLATE, max_len=64, bos_id=1)
  cond = query_states(lm, lm_params, queries, ids, mask)   # [B, Q, D] the DiT's condition

The prompt is `template.format(caption=...)`, left-padded to a fixed length (static shapes); the
Q query embeddings (BLIP3-o: 64, randn init, trained) are appended after it as the backbone's
`extra_embeds`, and the backbone's last hidden states after its final norm at the Q query
positions are the condition (no extra projector, as in BLIP3-o's code). The backbone's params
are an argument, never part of the trained state: nothing can update them, while gradients
flow through the backbone's activations to the queries. Padding gets segment id 0 and the
prompt + queries segment 1, so neither attends to the other; positions count from the first
real token (on the diagonal for a 2D-RoPE backbone, `pipeline.grid_positions`' text layout).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vlbpe_jax.lm import model as lm_model

TEMPLATE = "Please generate image based on the following caption: {caption}"


def encode_prompts(encode, captions, *, template: str, max_len: int, bos_id: int | None = None,
                   pad_id: int = 0):
  """Host-side: captions -> (ids [B, max_len] int32 left-padded, mask [B, max_len] bool).

  encode: text -> list of ids (e.g. `TextTokenizer.encode`). Empty captions and prompts longer
  than `max_len` tokens raise ValueError naming them.
  """
  if "{caption}" not in template:
    raise ValueError(f"template={template!r}: expected a '{{caption}}' field")
  if isinstance(captions, str) or not len(captions):
    raise ValueError(f"captions={captions!r}: expected a non-empty list of strings")
  ids = np.full((len(captions), max_len), pad_id, np.int32)
  mask = np.zeros((len(captions), max_len), bool)
  for i, caption in enumerate(captions):
    if not isinstance(caption, str) or not caption.strip():
      raise ValueError(f"caption {i} = {caption!r}: expected a non-empty string")
    toks = ([bos_id] if bos_id is not None else []) + list(encode(template.format(
        caption=caption.strip())))
    if len(toks) > max_len:
      raise ValueError(f"caption {i} ({caption[:60]!r}...) is {len(toks)} tokens with the "
                       f"template: longer than the prompt context max_len={max_len}")
    ids[i, max_len - len(toks):] = toks
    mask[i, max_len - len(toks):] = True
  return ids, mask


def query_states(lm, lm_params, queries, ids, mask, *, grid: bool = False):
  """The backbone's final-norm hidden states at the query positions.

  lm: `lm.model.LM`; lm_params: its params (frozen: only read). queries: [Q, D] float.
  ids: [B, T] int32 left-padded prompts, mask: [B, T] bool. grid: the backbone uses 2D RoPE
  positions (text on the diagonal). Returns [B, Q, D] in the backbone's dtype.

  Causal attention: the prompt never sees the queries, so its keys and values are computed
  once, forward only, into the KV cache (`lm.model.init_cache`), and only the Q query positions
  run with gradients (to the queries). Equal to one pass over `[prompt; queries]`
  (tests/test_dit_queries.py); on the demo it is ~1.7x cheaper per training step.
  """
  chex.assert_rank([ids, mask, queries], [2, 2, 2])
  chex.assert_equal_shape([ids, mask])
  b, t = ids.shape
  q = queries.shape[0]
  variables = {"params": jax.lax.stop_gradient(lm_params)}
  pos = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)  # [B, T]
  qpos = pos[:, -1:] + 1 + jnp.arange(q)[None]  # [B, Q]: after the last prompt token
  as_grid = lambda p: jnp.stack([p, p], axis=-1) if grid else p  # noqa: E731
  cache = lm_model.init_cache(lm.config, b, t + q)
  _, cache = lm.apply(variables, ids, positions=as_grid(pos), segment_ids=mask.astype(jnp.int32),
                      return_hidden=True, cache=cache)
  cache = jax.lax.stop_gradient(cache)
  extra = jnp.broadcast_to(queries[None], (b,) + queries.shape)  # [B, Q, D]
  h, _ = lm.apply(variables, jnp.zeros((b, 0), jnp.int32), positions=as_grid(qpos),
                  segment_ids=jnp.ones((b, q), jnp.int32), extra_embeds=extra,
                  return_hidden=True, cache=cache)  # [B, Q, D]
  return h
