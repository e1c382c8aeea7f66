"""Shared-prefix branches (`branch_ids`): several questions after one image, each seeing the
image and itself only. The blockwise kernel equals the masked reference in values and
gradients; in the model a branch's logits are those of its question asked alone after the
image, for every attention implementation that takes branches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlbpe_jax.lm import model as lm_model
from vlbpe_jax.lm.blockwise_attention import blockwise_attention


def _branch_mask(seg, br):
  same = seg[:, :, None] == seg[:, None, :]
  return (same & ((br[:, None, :] == 0) | (br[:, :, None] == br[:, None, :])))[:, None]


def _segments_and_branches(b, t, seed=0):
  """Packed rows: each segment a prefix (branch 0) then 1-3 branches of random lengths."""
  rng = np.random.default_rng(seed)
  seg, br = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  for r in range(b):
    at, s = 0, 1
    while at < t - 2:
      n = int(rng.integers(3, 12))
      seg[r, at:at + n], at = s, at + n  # the prefix
      for k in range(1, int(rng.integers(1, 4)) + 1):
        m = int(rng.integers(1, 6))
        seg[r, at:at + m], br[r, at:at + m] = s, k
        at += m
      s += 1
    seg[r, t:] = 0
  return jnp.asarray(seg[:, :t]), jnp.asarray(br[:, :t])


@pytest.mark.parametrize("block", [8, 64])
def test_blockwise_branches_match_masked_reference(block):
  b, t, n, nkv, k = 2, 45, 4, 2, 8
  keys = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(keys[0], (b, t, n, k))
  kk = jax.random.normal(keys[1], (b, t, nkv, k))
  v = jax.random.normal(keys[2], (b, t, nkv, k))
  dout = jax.random.normal(keys[3], q.shape)
  seg, br = _segments_and_branches(b, t)
  assert int(br.max()) >= 2  # several branches share a prefix somewhere

  @jax.jit
  def both(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: blockwise_attention(q, k, v, seg, block=block,
                                                           branch_ids=br), q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=_branch_mask(seg, br), is_causal=True), q, k, v)
    return out, ref, vjp(dout), ref_vjp(dout)

  out, ref, grads, ref_grads = both(q, kk, v)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=2e-5)
  # The branches matter: without them a later branch would read the earlier ones.
  plain = blockwise_attention(q, kk, v, seg, block=block)
  assert float(jnp.abs(plain - out).max()) > 1e-3


def test_blockwise_branches_without_segments_raise():
  x = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="branch_ids without segment_ids"):
    blockwise_attention(x, x, x, None, branch_ids=jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize("impl,scan", [(None, False), ("blockwise", False), ("blockwise", True)])
def test_branch_logits_equal_each_question_alone(impl, scan):
  """One row `image q1 a1 | q2 a2 | q3 a3` (branches restarting their positions after the
  image) gives, at every branch token, the logits of `image qk ak` run alone."""
  cfg = lm_model.lm_config("mu", text_vocab=50, dtype="float32", attention_impl=impl,
                           scan_layers=scan)
  model = lm_model.LM(cfg)
  rng = np.random.default_rng(0)
  image = rng.integers(1, 50, 9).tolist()
  qas = [rng.integers(1, 50, m).tolist() for m in (4, 3, 5)]
  ids = image + sum(qas, [])
  pos = list(range(len(image)))
  br = [0] * len(image)
  for k, qa in enumerate(qas, 1):
    pos += list(range(len(image), len(image) + len(qa)))
    br += [k] * len(qa)
  pad = 3  # a padding tail (segment 0) as packed rows have
  row = lambda x: jnp.asarray([x + [0] * pad], jnp.int32)
  seg = [1] * len(ids)
  params = nn.unbox(model.init(jax.random.key(0), row(ids))["params"])
  got = model.apply({"params": params}, row(ids), positions=row(pos), segment_ids=row(seg),
                    branch_ids=row(br))[0]
  at = len(image)
  for qa in qas:
    alone = model.apply({"params": params}, jnp.asarray([image + qa], jnp.int32))[0]
    np.testing.assert_allclose(got[at:at + len(qa)], alone[len(image):], atol=2e-5)
    at += len(qa)
  np.testing.assert_allclose(got[:len(image)], alone[:len(image)], atol=2e-5)
  # Without branch ids the second and third questions read the earlier ones: not equal.
  plain = model.apply({"params": params}, row(ids), positions=row(pos), segment_ids=row(seg))[0]
  assert float(jnp.abs(plain[len(image) + 4:len(ids)] - got[len(image) + 4:len(ids)]).max()) > 1e-4


def test_branch_ids_need_segments_and_no_splash():
  cfg = lm_model.lm_config("mu", text_vocab=50, dtype="float32")
  model = lm_model.LM(cfg)
  ids = jnp.ones((1, 6), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
  with pytest.raises(ValueError, match="branch_ids: expected segment_ids"):
    model.apply({"params": params}, ids, branch_ids=jnp.zeros((1, 6), jnp.int32))
  splash = lm_model.LM(lm_model.lm_config("mu", text_vocab=50, dtype="float32",
                                          attention_impl="splash"))
  with pytest.raises(ValueError, match="attention_impl='splash'"):
    splash.apply({"params": params}, ids, segment_ids=jnp.ones((1, 6), jnp.int32),
                 branch_ids=jnp.zeros((1, 6), jnp.int32))


def test_branch_row_loss_equals_the_questions_asked_one_per_row():
  """train.loss_fn on one row `image | qa1 | qa2 | qa3` (branches) equals it on three rows
  `image qak` (the evaluation's layout): the same answers, predicted from the same context."""
  from vlbpe_jax.lm import train as lm_train  # pylint: disable=g-import-not-at-top
  model = lm_model.LM(lm_model.lm_config("mu", text_vocab=60, dtype="float32",
                                         attention_impl="blockwise"))
  rng = np.random.default_rng(3)
  image = rng.integers(1, 60, 11).tolist()
  qas = [(rng.integers(1, 60, q).tolist(), rng.integers(1, 60, a).tolist())
         for q, a in ((3, 1), (4, 2), (2, 1))]

  def shifted(ids, mask, pos, br, width):
    n = len(ids) - 1
    pad = lambda x: np.pad(np.asarray(x[:n] if x is not mask else x[1:]), (0, width - n))
    return {"inputs": pad(ids), "targets": np.pad(ids[1:], (0, width - n)),
            "loss_mask": np.pad(mask[1:], (0, width - n)).astype(bool),
            "segment_ids": np.pad(np.ones(n, np.int32), (0, width - n)),
            "positions": pad(pos), "branch_ids": pad(br)}

  ids, mask, br = list(image), [False] * len(image), [0] * len(image)
  for k, (q, a) in enumerate(qas, 1):
    ids += q + a
    mask += [False] * len(q) + [True] * len(a)
    br += [k] * (len(q) + len(a))
  from vlbpe_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pos = pipeline.branch_positions(np.arange(len(ids)), np.asarray(br))
  one = shifted(np.asarray(ids), np.asarray(mask), pos, np.asarray(br), 40)
  rows = [shifted(np.asarray(image + q + a), np.asarray([False] * (len(image) + len(q)) +
                                                         [True] * len(a)),
                  np.arange(len(image) + len(q) + len(a)), np.zeros(40, np.int32), 40)
          for q, a in qas]
  many = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  del many["branch_ids"]
  one = {k: v[None] for k, v in one.items()}
  params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(one["inputs"]))["params"])
  loss_one, _ = lm_train.loss_fn(params, one, jax.random.key(1), model=model)
  loss_many, _ = lm_train.loss_fn(params, many, jax.random.key(1), model=model)
  np.testing.assert_allclose(loss_one, loss_many, rtol=1e-5)
  del one["branch_ids"]  # one line without branches: later answers read earlier pairs
  loss_line, _ = lm_train.loss_fn(params, one, jax.random.key(1), model=model)
  assert abs(float(loss_line) - float(loss_many)) > 1e-4
