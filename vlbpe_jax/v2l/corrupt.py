"""V2L's restoration protocol on token maps: noisy copies, masks, iterative write-back.

  copies = corrupted_copies(rng, clean, local_ids)               # [10, h, w], rates() order
  restored = restore_masked(predict, clean, inpaint_mask(16, 16), copies, n=16, m=2)
  restored = restore_same_positions(predict, blurred, copies_in, copies, m=2)

Settled as in the public code (eval_denoising_generation.py), not the paper text:
- Examples are 10 copies of the SAME image's map, each with floor(rate * h * w) random local
  positions replaced by random ids of the local vocabulary, rates 0.50, 0.47, ..., 0.23. (The
  code counts the 21 global tokens in the base, floor(rate * 277), and replaces only local
  positions; we use the local count.) At a window, copy i gives one (input -> output) pair.
- Inpainting / outpainting: raster order; at each masked position s the input is the n = 16
  tokens before s (the query's map with earlier predictions written back), the output the m = 2
  tokens at s, s+1; examples are the same windows of the copies. Only masked positions are
  written (the code also overwrites an unmasked token when a run has odd length).
- Deblur / shift / rotation: n = m = 2 at the same positions: input = the corrupted map's
  tokens at [s, s+m), output = the clean tokens there; examples map the copies of the corrupted
  map (`copies_in`) to the copies of the clean map (`copies_out`, same replaced positions and
  ids). We follow the code here because its n + m -> m variant of the paper is not specified
  (the paper states n = 16 only for the painting tasks) and a same-position pair is the direct
  analogue of "restore this token".
`predict(contexts [B, n], inputs [B, K, n], outputs [B, K, m']) -> [B, m]` is the LM call,
batched: row b asks for the m tokens after contexts[b] given its K examples (inputs[b, i] ->
outputs[b, i]; m' = m but at a window cut by the map's end). Windows that do not depend on one
another share a call: every window of the same-position tasks, and each window of the
painting tasks over all images restored together.
"""

import numpy as np

NUM_COPIES = 10


def rates() -> tuple[float, ...]:
  """The 10 replacement rates 0.50, 0.47, ..., 0.23 (steps of 3%)."""
  return tuple(round(0.50 - 0.03 * i, 2) for i in range(NUM_COPIES))


def num_replaced(rate: float, n: int) -> int:
  """floor(rate * n), robust to float error (0.29 * 100 = 28.999... counts 29)."""
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"rate={rate}: expected a value in [0, 1]")
  return int(np.floor(rate * n + 1e-9))


def random_replace(rng, tokens, rate, vocab_ids, *, paired=None):
  """Replaces floor(rate * h * w) random positions of `tokens` ([h, w] int) by random ids of
  `vocab_ids` ([K] allowed local ids). `paired` ([h, w]): also returned with the SAME positions
  and ids replaced (the corrupted-image map of the code). Returns a copy (or two)."""
  tokens = np.asarray(tokens)
  vocab_ids = np.asarray(vocab_ids).reshape(-1)
  if tokens.ndim != 2:
    raise ValueError(f"tokens {tokens.shape}: expected a [h, w] map")
  if vocab_ids.size == 0:
    raise ValueError("vocab_ids: expected at least one allowed id")
  if paired is not None and np.shape(paired) != tokens.shape:
    raise ValueError(f"paired {np.shape(paired)}: expected {tokens.shape}")
  k = num_replaced(rate, tokens.size)
  where = rng.permutation(tokens.size)[:k]
  new = rng.choice(vocab_ids, size=k)
  out = tokens.copy().reshape(-1)
  out[where] = new
  if paired is None:
    return out.reshape(tokens.shape)
  other = np.array(paired).reshape(-1)
  other[where] = new
  return out.reshape(tokens.shape), other.reshape(tokens.shape)


def corrupted_copies(rng, tokens, vocab_ids, *, paired=None):
  """The 10 copies at `rates()`: `[10, h, w]` (and the paired copies when `paired` is given)."""
  pairs = [random_replace(rng, tokens, r, vocab_ids, paired=paired) for r in rates()]
  if paired is None:
    return np.stack(pairs)
  return np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])


def inpaint_mask(h: int, w: int) -> np.ndarray:
  """Centre h/2 x w/2 (16x16: rows and cols 4-11, 64 tokens): `[h, w]` bool."""
  _even(h, w)
  mask = np.zeros((h, w), bool)
  mask[h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2] = True
  return mask


def outpaint_mask(h: int, w: int) -> np.ndarray:
  """Bottom half (16x16: rows 8-15, 128 tokens): `[h, w]` bool."""
  _even(h, w)
  mask = np.zeros((h, w), bool)
  mask[h // 2:] = True
  return mask


def _even(h, w):
  if h < 2 or w < 2 or h % 2 or w % 2:
    raise ValueError(f"map {h}x{w}: expected even sizes >= 2")


def _check_maps(tokens, copies, name="copies"):
  """[h, w] and [K, h, w] (one map), or [N, h, w] and [N, K, h, w] (N maps restored together)
  -> (tokens [N, h*w], copies [N, K, h*w])."""
  tokens, copies = np.asarray(tokens), np.asarray(copies)
  one = tokens.ndim == 2
  if one:
    tokens, copies = tokens[None], copies[None]
  if (tokens.ndim != 3 or copies.ndim != 4 or copies.shape[0] != tokens.shape[0]
      or copies.shape[2:] != tokens.shape[1:]):
    raise ValueError(f"tokens {np.shape(tokens[0] if one else tokens)}, {name} "
                     f"{np.shape(copies[0] if one else copies)}: expected [h, w] and [K, h, w], "
                     "or [N, h, w] and [N, K, h, w]")
  n = tokens.shape[0]
  return tokens.reshape(n, -1), copies.reshape(n, copies.shape[1], -1)


def _predicted(predict, contexts, inputs, outputs, m):
  out = np.asarray(predict(contexts, inputs, outputs))
  if out.shape != (len(contexts), m):
    raise ValueError(f"predict returned {out.shape} tokens: expected ({len(contexts)}, {m})")
  return out


def restore_masked(predict, tokens, mask, copies, *, n=16, m=2):
  """Inpainting / outpainting with write-back (see the module docstring).

  tokens: `[h, w]` the query's map, or `[N, h, w]` N maps restored together (one `predict`
  call per window for all N; each map's result is what it gets alone); mask: `[h, w]` bool,
  True = to predict; copies: `[K, h, w]` example maps (`[N, K, h, w]`). Returns the map(s)
  with exactly the masked positions rewritten, in raster order. Every masked position needs n
  tokens before it.
  """
  out, ex = _check_maps(tokens, copies)
  mask = np.asarray(mask, bool)
  if mask.shape != np.shape(tokens)[-2:]:
    raise ValueError(f"mask {mask.shape}: expected {np.shape(tokens)[-2:]}")
  if n < 1 or m < 1:
    raise ValueError(f"n={n}, m={m}: expected >= 1")
  keep = mask.reshape(-1)
  if keep.any() and np.argmax(keep) < n:
    raise ValueError(f"first masked raster position {np.argmax(keep)} has fewer than n={n} "
                     "tokens before it")
  out, s, size = out.copy(), 0, out.shape[1]
  while s < size:
    if not keep[s]:
      s += 1
      continue
    e = min(s + m, size)
    pred = _predicted(predict, out[:, s - n:s].copy(), ex[:, :, s - n:s], ex[:, :, s:e],
                      m)[:, :e - s]
    out[:, s:e] = np.where(keep[s:e], pred, out[:, s:e])
    s = e
  return out.reshape(np.shape(tokens))


def restore_same_positions(predict, corrupted, copies_in, copies_out, *, m=2):
  """Deblur / shift / rotation, n = m (see the module docstring): each window [s, s+m) of the
  corrupted map `[h, w]` is replaced by `predict(corrupted[s:s+m], examples)` with examples
  (copies_in[i, s:s+m] -> copies_out[i, s:s+m]). Every window is independent of the others:
  one `predict` call takes all full windows (of all maps: `corrupted` `[N, h, w]` with copies
  `[N, K, h, w]`), one more the cut last window. Returns the restored map(s)."""
  flat, ex_in = _check_maps(corrupted, copies_in, "copies_in")
  _, ex_out = _check_maps(corrupted, copies_out, "copies_out")
  if ex_in.shape != ex_out.shape or m < 1:
    raise ValueError(f"copies_in {np.shape(copies_in)}, copies_out {np.shape(copies_out)}, "
                     f"m={m}: expected equal shapes and m >= 1")
  num, k, size = ex_in.shape
  out = flat.copy()
  full = size // m * m
  if full:  # windows [s, s+m) of every map -> rows (map, window)
    rows = lambda x: x[..., :full].reshape(num, -1, size // m, m)  # noqa: E731
    ctx = flat[:, :full].reshape(-1, m)
    xin = rows(ex_in).transpose(0, 2, 1, 3).reshape(-1, k, m)
    xout = rows(ex_out).transpose(0, 2, 1, 3).reshape(-1, k, m)
    out[:, :full] = _predicted(predict, ctx.copy(), xin, xout, m).reshape(num, full)
  if full < size:
    out[:, full:] = _predicted(predict, flat[:, full:].copy(), ex_in[:, :, full:],
                               ex_out[:, :, full:], m)[:, :size - full]
  return out.reshape(np.shape(corrupted))
