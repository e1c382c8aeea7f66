"""Tests for vlbpe_jax/v2l/corrupt.py (restoration protocol) and degrade.py (image
corruptions): schedule, masks, replacement counts, write-back order, errors."""

import numpy as np
import pytest

from vlbpe_jax.v2l import corrupt
from vlbpe_jax.v2l import degrade


def test_rates_and_counts():
  assert corrupt.rates() == (0.5, 0.47, 0.44, 0.41, 0.38, 0.35, 0.32, 0.29, 0.26, 0.23)
  assert [corrupt.num_replaced(r, 256) for r in corrupt.rates()] == [
      128, 120, 112, 104, 97, 89, 81, 74, 66, 58]
  assert corrupt.num_replaced(0.29, 100) == 29  # 0.29 * 100 = 28.999... in floats
  with pytest.raises(ValueError, match="rate=1.5"):
    corrupt.num_replaced(1.5, 10)


def test_masks_positions_and_counts():
  inp = corrupt.inpaint_mask(16, 16)
  rows, cols = np.nonzero(inp)
  assert inp.sum() == 64 and set(rows) == set(cols) == set(range(4, 12))
  out = corrupt.outpaint_mask(16, 16)
  assert out.sum() == 128 and out[8:].all() and not out[:8].any()
  assert corrupt.inpaint_mask(4, 8).sum() == 8
  with pytest.raises(ValueError, match="5x16"):
    corrupt.inpaint_mask(5, 16)


def test_random_replace_counts_allowed_ids_and_pairing():
  rng = np.random.default_rng(0)
  clean = np.full((16, 16), 1000)
  other = np.full((16, 16), 2000)
  allowed = np.array([3, 7, 11, 40])
  for rate in corrupt.rates():
    a, b = corrupt.random_replace(rng, clean, rate, allowed, paired=other)
    hit = a != 1000
    assert hit.sum() == corrupt.num_replaced(rate, 256)
    assert np.isin(a[hit], allowed).all()
    assert (b != 2000).sum() == hit.sum() and (b[hit] == a[hit]).all()
  copies = corrupt.corrupted_copies(np.random.default_rng(1), clean, allowed)
  assert copies.shape == (10, 16, 16)
  assert [(c != 1000).sum() for c in copies] == [corrupt.num_replaced(r, 256)
                                                 for r in corrupt.rates()]
  again = corrupt.corrupted_copies(np.random.default_rng(1), clean, allowed)
  np.testing.assert_array_equal(copies, again)
  with pytest.raises(ValueError, match="vocab_ids"):
    corrupt.random_replace(rng, clean, 0.5, [])
  with pytest.raises(ValueError, match="tokens"):
    corrupt.random_replace(rng, clean.reshape(-1), 0.5, allowed)


def _copy_predictor(clean, calls, n, m):
  """Predicts from a map whose tokens are unique: the m tokens after each context's last."""
  flat = clean.reshape(-1)

  def predict(contexts, inputs, outputs):
    assert contexts.shape[1] == n and inputs.shape[1:] == (10, n)
    assert outputs.shape[:2] == (len(contexts), 10) and 1 <= outputs.shape[2] <= m
    out = []
    for context in contexts:
      s = int(np.flatnonzero(flat == context[-1])[0]) + 1
      calls.append(s)
      out.append(flat[s:s + m] if s + m <= flat.size
                 else np.r_[flat[s:], [0] * (s + m - flat.size)])
    return np.stack(out)
  return predict


@pytest.mark.parametrize("maker", [corrupt.inpaint_mask, corrupt.outpaint_mask])
def test_restore_masked_exact_with_a_copying_predictor(maker):
  clean = np.arange(256).reshape(16, 16)
  mask = maker(16, 16)
  query = np.where(mask, -1, clean)  # masked content is unknown
  copies = corrupt.corrupted_copies(np.random.default_rng(0), clean, np.arange(256))
  calls = []
  restored = corrupt.restore_masked(_copy_predictor(clean, calls, 16, 2), query, mask, copies)
  np.testing.assert_array_equal(restored, clean)
  starts = np.flatnonzero(mask.reshape(-1))[::2]
  assert calls == starts.tolist()  # raster order, one call per 2 masked tokens


def test_restore_masked_writes_only_masked_positions_and_passes_the_windows():
  tokens = np.arange(1, 5 * 6 + 1).reshape(5, 6)
  mask = np.zeros((5, 6), bool)
  mask[2, 1:4] = True  # an odd run of 3
  mask[4, 5] = True  # the last position
  copies = np.stack([tokens * 100 + i for i in range(10)])
  seen = []

  def predict(contexts, inputs, outputs):
    assert len(contexts) == 1  # one map: one row per call
    seen.append((contexts[0].tolist(), [(x.tolist(), y.tolist())
                                        for x, y in zip(inputs[0], outputs[0])]))
    return np.array([[-7, -8]])

  out = corrupt.restore_masked(predict, tokens, mask, copies, n=4, m=2)
  assert (out[mask] == [-7, -8, -7, -7]).all() and (out[~mask] == tokens[~mask]).all()
  assert len(seen) == 3
  flat = tokens.reshape(-1)
  assert seen[0][0] == flat[9:13].tolist()
  assert seen[1][0] == flat[11:13].tolist() + [-7, -8]  # the write-back is the next context
  assert seen[0][1][3] == ((flat[9:13] * 100 + 3).tolist(), (flat[13:15] * 100 + 3).tolist())
  assert seen[2][1][0][1] == [flat[29] * 100]  # the window is cut at the map's end


def _mixing_predictor(calls, m):
  """A deterministic function of each row alone (its context and examples), to compare maps
  restored together with maps restored one at a time."""
  def predict(contexts, inputs, outputs):
    calls.append(len(contexts))
    mix = contexts.sum(1) * 7 + inputs.sum((1, 2)) * 3 + outputs.sum((1, 2))
    return np.stack([mix % 97 + j for j in range(m)], axis=1)
  return predict


def test_maps_restored_together_equal_each_restored_alone():
  rng = np.random.default_rng(5)
  maps = rng.integers(0, 50, (3, 6, 6))
  mask = corrupt.inpaint_mask(6, 6)
  copies = np.stack([corrupt.corrupted_copies(rng, t, np.arange(50)) for t in maps])
  calls = []
  together = corrupt.restore_masked(_mixing_predictor(calls, 2), maps, mask, copies, n=4, m=2)
  assert calls == [3] * 6  # one call per window for the 3 maps (3 masked rows of 3: 2 each)
  alone = [corrupt.restore_masked(_mixing_predictor([], 2), t, mask, c, n=4, m=2)
           for t, c in zip(maps, copies)]
  np.testing.assert_array_equal(together, np.stack(alone))
  assert (together[:, mask] != maps[:, mask]).any()  # the predictor did write
  # Same positions, a map of 15 tokens (7 full windows and a cut one): two calls for all maps.
  bad = rng.integers(0, 50, (3, 3, 5))
  pairs = [corrupt.corrupted_copies(rng, t, np.arange(50), paired=b)
           for t, b in zip(rng.integers(0, 50, (3, 3, 5)), bad)]
  c_out, c_in = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
  calls = []
  together = corrupt.restore_same_positions(_mixing_predictor(calls, 2), bad, c_in, c_out, m=2)
  assert calls == [3 * 7, 3]
  alone = [corrupt.restore_same_positions(_mixing_predictor([], 2), b, i, o, m=2)
           for b, i, o in zip(bad, c_in, c_out)]
  np.testing.assert_array_equal(together, np.stack(alone))
  with pytest.raises(ValueError, match=r"\[N, h, w\] and \[N, K, h, w\]"):
    corrupt.restore_masked(_mixing_predictor([], 2), maps, mask, copies[:2], n=4)


def test_restore_masked_errors():
  tokens, copies = np.zeros((4, 4), int), np.zeros((10, 4, 4), int)
  mask = corrupt.inpaint_mask(4, 4)
  ok = lambda c, x, y: np.zeros((len(c), 2))
  with pytest.raises(ValueError, match="fewer than n=16"):
    corrupt.restore_masked(ok, tokens, mask, copies)
  with pytest.raises(ValueError, match="mask"):
    corrupt.restore_masked(ok, tokens, mask[:2], copies, n=2)
  with pytest.raises(ValueError, match="copies"):
    corrupt.restore_masked(ok, tokens, mask, copies[:, :2], n=2)
  with pytest.raises(ValueError, match="predict returned"):
    corrupt.restore_masked(lambda c, x, y: np.zeros((len(c), 3)), tokens, mask, copies, n=2)


def test_restore_same_positions_windows_and_examples():
  corrupted = np.arange(20).reshape(4, 5)
  copies_in = np.stack([corrupted + 100 * i for i in range(10)])
  copies_out = np.stack([corrupted + 1000 * i for i in range(10)])
  seen = []

  def predict(contexts, inputs, outputs):
    seen.append(contexts.tolist())
    for context, xs, ys in zip(contexts, inputs, outputs):
      assert all(np.array_equal(x - 100 * i, y - 1000 * i) for i, (x, y) in enumerate(zip(xs, ys)))
      assert xs.shape == (10,) + context.shape
    return np.stack([contexts[:, 0] + 50, contexts[:, 0] + 60], axis=1)

  out = corrupt.restore_same_positions(predict, corrupted, copies_in, copies_out, m=2)
  assert seen == [[[s, s + 1] for s in range(0, 20, 2)]]  # every window in one call
  np.testing.assert_array_equal(out.reshape(-1)[0::2], np.arange(0, 20, 2) + 50)
  np.testing.assert_array_equal(out.reshape(-1)[1::2], np.arange(0, 20, 2) + 60)
  with pytest.raises(ValueError, match="copies_out"):
    corrupt.restore_same_positions(predict, corrupted, copies_in, copies_out[:5], m=2)


def _ramp():
  x = np.zeros((16, 16, 3), np.uint8)
  x[..., 0] = np.arange(16)[:, None] * 10
  x[..., 1] = np.arange(16)[None, :] * 10
  return x


def test_image_corruptions():
  x = _ramp()
  flat = np.full((2, 16, 16, 3), 77, np.uint8)
  np.testing.assert_array_equal(degrade.gaussian_blur(flat, 1.5), flat)
  checker = ((np.indices((16, 16)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1)
  blurred = degrade.gaussian_blur(checker, 1.0)
  assert blurred.dtype == np.uint8 and blurred.std() < 0.1 * checker.std()
  np.testing.assert_array_equal(degrade.shift(x, 2, -3, "wrap"), np.roll(x, (2, -3), (0, 1)))
  s = degrade.shift(x, 2, 3, "edge")
  np.testing.assert_array_equal(s[2:, 3:], x[:-2, :-3])
  np.testing.assert_array_equal(s[:2, 3:], np.repeat(x[:1, :-3], 2, axis=0))
  np.testing.assert_array_equal(degrade.rotate(x, 0.0), x)
  r = degrade.rotate(np.stack([x, x]), 10.0)
  assert r.shape == (2, 16, 16, 3) and r.dtype == np.uint8 and (r[0] != x).any()
  np.testing.assert_array_equal(r[0], r[1])
  with pytest.raises(ValueError, match="uint8"):
    degrade.gaussian_blur(x.astype(np.float32))
  with pytest.raises(ValueError, match="fill="):
    degrade.shift(x, 1, 1, "zero")
  with pytest.raises(ValueError, match="dy=16"):
    degrade.shift(x, 16, 0)
