"""Batched autoregressive generation with a KV cache (greedy, temperature, top-k, top-p).

  ids, mask = left_pad([[1, 5, 9], [1, 7]], pad_id=0)
  tokens, lengths = generate(model, params, ids, mask, key, max_new_tokens=16,
                             temperature=0.7, top_p=0.9, stop_tokens=(2,))

Prompts are left-padded to a common length P, so that every row writes its next key/value at
the same cache slot; each row's RoPE positions count only its real tokens and padding slots are
masked out of attention. An image in a prompt is its token sequence between the image
begin/end special tokens: the caller builds those ids.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vlbpe_jax.lm import model as lm_model


def left_pad(prompts, pad_id=0, multiple: int = 1):
  """Host-side: list of int sequences -> (ids `[B, P]` int32, mask `[B, P]` bool); P is the
  longest prompt rounded up to `multiple` (fewer distinct shapes: fewer compilations)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError(f"prompts={prompts!r}: expected a non-empty list of non-empty sequences")
  if multiple < 1:
    raise ValueError(f"multiple={multiple}: expected >= 1")
  width = -(-max(len(p) for p in prompts) // multiple) * multiple
  ids = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = p
    mask[i, width - len(p):] = True
  return ids, mask


def sample_logits(logits, key, temperature=0.0, top_k=0, top_p=1.0):
  """logits: `[B, V]` float32 -> `[B]` int32. temperature 0 = greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep = before < top_p  # always keeps the top token
    thresh = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < thresh, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "stop_tokens", "pad_id"))
def _generate(model, params, ids, mask, positions, key, max_new_tokens, temperature, top_k,
              top_p, stop_tokens, pad_id, allowed):
  b, p = ids.shape

  def sample(logits, k):
    if allowed is not None:
      logits = jnp.where(allowed, logits, -jnp.inf)
    return sample_logits(logits, k, temperature=temperature, top_k=top_k, top_p=top_p)
  apply = lambda tok, pos, seg, cache: model.apply({"params": params}, tok, positions=pos,
                                                   segment_ids=seg, cache=cache)
  cache = lm_model.init_cache(model.config, b, p + max_new_tokens)
  if positions is None:
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # [B, P]
  logits, cache = apply(ids, positions, mask.astype(jnp.int32), cache)
  stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

  def body(state):
    i, cache, tok, pos, done, out = state
    out = out.at[:, i].set(jnp.where(done, pad_id, tok))
    done = done | jnp.isin(tok, stops)
    logits, cache = apply(tok[:, None], pos[:, None], jnp.ones((b, 1), jnp.int32), cache)
    tok = sample(logits[:, -1], jax.random.fold_in(key, i + 1))
    return i + 1, cache, tok, pos + 1, done, out

  def cond(state):
    return (state[0] < max_new_tokens) & ~jnp.all(state[4])

  tok = sample(logits[:, -1], jax.random.fold_in(key, 0))
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  state = (jnp.int32(0), cache, tok, positions[:, -1] + 1, jnp.zeros((b,), bool), out)
  _, _, _, _, _, out = jax.lax.while_loop(cond, body, state)
  stopped = jnp.isin(out, stops)
  first_stop = jnp.argmax(stopped, axis=1)
  lengths = jnp.where(stopped.any(axis=1), first_stop + 1, max_new_tokens)
  return out, lengths.astype(jnp.int32)


def generate(model, params, ids, mask, key, *, max_new_tokens, temperature=0.0, top_k=0,
             top_p=1.0, stop_tokens=(), pad_id=0, positions=None, allowed=None):
  """Generates up to `max_new_tokens` per row.

  ids: `[B, P]` int32 left-padded prompts; mask: `[B, P]` bool (True = real token).
  positions: the prompts' RoPE positions, `[B, P]` or `[B, P, 2]` (2D RoPE; left-padded like
  ids); default: each row's real tokens count 0, 1, ... New tokens continue from the last
  prompt position + 1 (on both axes in 2D).
  allowed: `[V]` bool, the ids that may be generated (the others' logits are -inf before
  sampling: greedy = the arg-max over the allowed ids, ties to the smallest); None = all.
  Returns `(tokens [B, N] int32, lengths [B] int32)`: a row ends after its first stop token
  (included in `lengths`) and is `pad_id` from there on.
  """
  chex.assert_rank([ids, mask], 2)
  chex.assert_equal_shape([ids, mask])
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
  if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
    raise ValueError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}: expected "
                     "temperature >= 0, top_k >= 0, 0 < top_p <= 1")
  host_ids, host_mask = np.asarray(ids), np.asarray(mask)
  if not host_mask[:, -1].all():
    raise ValueError("mask: every prompt must end at the last column (left padding) and be "
                     "non-empty")
  vocab = model.config.vocab_size
  if host_ids.min() < 0 or host_ids[host_mask].max() >= vocab:
    raise ValueError(f"ids outside [0, {vocab}): min {host_ids.min()}, max {host_ids.max()}")
  if positions is not None:
    positions = jnp.asarray(positions, jnp.int32)
    if positions.shape not in (host_ids.shape, host_ids.shape + (2,)):
      raise ValueError(f"positions {positions.shape}: expected {host_ids.shape} or "
                       f"{host_ids.shape + (2,)}")
  if allowed is not None:
    allowed = np.asarray(allowed)
    if allowed.shape != (vocab,) or allowed.dtype != np.bool_ or not allowed.any():
      raise ValueError(f"allowed {allowed.shape} {allowed.dtype}: expected a [{vocab}] bool "
                       "array with at least one True")
    allowed = jnp.asarray(allowed)
  return _generate(model, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool),
                   positions, key, int(max_new_tokens), float(temperature), int(top_k),
                   float(top_p), tuple(int(s) for s in stop_tokens), int(pad_id), allowed)
