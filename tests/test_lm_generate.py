"""KV-cache generation: cached logits equal the full forward, greedy equals a cache-free loop."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlbpe_jax.lm import generate as gen
from vlbpe_jax.lm import model as lm_model

VOCAB = 48


@functools.cache
def make(scan=False):
  cfg = lm_model.lm_config("mu", text_vocab=40, num_special=2, num_vq=6, dtype="float32",
                           scan_layers=scan)
  model = lm_model.LM(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  return model, params["params"]


@functools.cache
def forward(model):
  return jax.jit(lambda p, ids, cache=None, pos=None, seg=None: model.apply(
      {"params": p}, ids, positions=pos, segment_ids=seg, cache=cache))


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_logits_equal_full_forward(scan):
  model, params = make(scan)
  fwd = forward(model)
  rows = [[3, 41, 7, 44, 9, 2, 5, 47], [12, 13, 40, 1, 30]]  # prompt of 4 / 2, then forced
  prompt_lens = [4, 2]
  ids, mask = gen.left_pad([r[:n] for r, n in zip(rows, prompt_lens)])  # [2, 4]
  cache = lm_model.init_cache(model.config, 2, 12)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  logits, cache = fwd(params, ids, cache, pos, mask.astype(np.int32))
  steps = [logits[:, -1]]
  for t in range(3):  # teacher-forced decode steps
    tok = jnp.array([[rows[0][4 + t]], [rows[1][2 + t]]])
    logits, cache = fwd(params, tok, cache, jnp.array([[4 + t], [2 + t]]))
    steps.append(logits[:, -1])
  for b, (row, n) in enumerate(zip(rows, prompt_lens)):
    full = fwd(params, jnp.array([row[:n + 3]]))[0]  # [n + 3, V]
    for t, got in enumerate(steps):
      np.testing.assert_allclose(got[b], full[n - 1 + t], atol=2e-5, rtol=1e-5)


def naive_greedy(model, params, prompt, n):
  fwd, seq = forward(model), list(prompt)
  for _ in range(n):
    seq.append(int(jnp.argmax(fwd(params, jnp.array([seq]))[0, -1])))
  return seq[len(prompt):]


def test_greedy_generation_matches_cache_free_loop_and_stops():
  model, params = make()
  prompts = [[5, 41, 6, 7], [9, 45]]
  ids, mask = gen.left_pad(prompts)
  toks, lengths = gen.generate(model, params, ids, mask, jax.random.key(1), max_new_tokens=5)
  want = [naive_greedy(model, params, p, 5) for p in prompts]
  np.testing.assert_array_equal(toks, want)
  np.testing.assert_array_equal(lengths, [5, 5])
  stop = want[0][1]  # row 0 stops after two tokens (at the latest)
  toks, lengths = gen.generate(model, params, ids, mask, jax.random.key(1), max_new_tokens=5,
                               stop_tokens=(stop,), pad_id=-1)
  first = want[0].index(stop) + 1
  assert lengths[0] == first and list(toks[0, :first]) == want[0][:first]
  assert (np.asarray(toks[0, first:]) == -1).all()


def test_allowed_ids_mask_greedy_and_sampling():
  # `allowed`: each generated id is the arg-max over the allowed ids only (a cache-free loop
  # with the others' logits at -inf), and sampling never leaves the set.
  model, params = make()
  fwd = forward(model)
  prompts = [[5, 41, 6, 7], [9, 45]]
  ids, mask = gen.left_pad(prompts)
  free = [naive_greedy(model, params, p, 4) for p in prompts]
  allowed = np.zeros(VOCAB, bool)
  allowed[[3, 8, 11, 20, 33]] = True
  assert not all(allowed[free[0]])  # the mask changes what greedy writes
  toks, _ = gen.generate(model, params, ids, mask, jax.random.key(1), max_new_tokens=4,
                         allowed=allowed)
  for row, prompt in zip(np.asarray(toks), prompts):
    seq = list(prompt)
    for _ in range(4):
      logits = np.asarray(fwd(params, jnp.array([seq])))[0, -1]
      seq.append(int(np.argmax(np.where(allowed, logits, -np.inf))))
    assert row.tolist() == seq[len(prompt):]
  sampled, _ = gen.generate(model, params, ids, mask, jax.random.key(2), max_new_tokens=8,
                            temperature=1.0, allowed=allowed)
  assert allowed[np.asarray(sampled)].all()
  for bad in (np.zeros(VOCAB, bool), np.ones(VOCAB - 1, bool), np.ones(VOCAB, np.int32)):
    with pytest.raises(ValueError, match="allowed"):
      gen.generate(model, params, ids, mask, jax.random.key(1), max_new_tokens=2, allowed=bad)


def test_greedy_generation_with_2d_positions_matches_cache_free_loop():
  model, params = make()
  fwd = forward(model)
  prompts = [[5, 41, 44, 45, 46, 7], [9, 42, 43]]
  grids = [np.array([[0, 0], [1, 1], [2, 2], [2, 3], [3, 2], [4, 4]]),  # 2x2 image block
           np.array([[0, 0], [1, 1], [2, 2]])]
  ids, mask = gen.left_pad(prompts)
  pos = np.zeros(ids.shape + (2,), np.int32)
  for i, g in enumerate(grids):
    pos[i, ids.shape[1] - len(g):] = g
  toks, _ = gen.generate(model, params, ids, mask, jax.random.key(1), max_new_tokens=4,
                         positions=pos)
  for row, prompt, grid in zip(np.asarray(toks), prompts, grids):
    seq, seq_pos = list(prompt), [list(p) for p in grid]
    for _ in range(4):
      logits = fwd(params, jnp.array([seq]), None, jnp.array([seq_pos]))
      seq.append(int(jnp.argmax(logits[0, -1])))
      seq_pos.append([seq_pos[-1][0] + 1, seq_pos[-1][1] + 1])
    assert row.tolist() == seq[len(prompt):]
  with pytest.raises(ValueError, match="positions"):
    gen.generate(model, params, ids, mask, jax.random.key(1), max_new_tokens=2,
                 positions=pos[:, :2])


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 256))
  keys = jax.random.key(2)
  greedy = gen.sample_logits(logits, keys)
  assert (greedy == 0).all()
  assert (gen.sample_logits(logits, keys, temperature=1.0, top_k=1) == 0).all()
  assert (gen.sample_logits(logits, keys, temperature=1.0, top_p=0.4) == 0).all()
  s = np.asarray(gen.sample_logits(logits, keys, temperature=1.0, top_k=2))
  assert set(s) == {0, 1}
  s = np.asarray(gen.sample_logits(logits, keys, temperature=1.0, top_p=0.7))
  assert set(s) == {0, 1}  # 0.5 + 0.3 covers 0.7
  s = np.asarray(gen.sample_logits(logits, keys, temperature=1.0))
  assert set(s) == {0, 1, 2, 3}


def test_generate_rejects_bad_input():
  model, params = make()
  ids, mask = gen.left_pad([[1, 2]])
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=0)
  with pytest.raises(ValueError, match="ids outside"):
    gen.generate(model, params, ids + VOCAB, mask, jax.random.key(0), max_new_tokens=2)
  with pytest.raises(ValueError, match="left padding"):
    gen.generate(model, params, ids, mask[:, ::-1] & False, jax.random.key(0), max_new_tokens=2)
  with pytest.raises(ValueError, match="prompts"):
    gen.left_pad([[1], []])
