"""The incremental learner equals a brute-force recount-everything reference, merge by merge."""

import collections
import math

import numpy as np
import pytest

from vlbpe_jax.bpe import VisualBPE


def brute_force(grids, base, num_merges, offsets, alpha=0.0, sigma=0.5, min_count=2):
  """Reference learner: after every merge recount all neighbouring token pairs from scratch.

  Tokens are dicts anchor -> id; `own[n][y][x]` is the anchor covering a cell; two tokens are
  neighbours when two of their cells differ by +-offset; pair (first, second) in raster order.
  """
  n_img, h, w = grids.shape
  tok = [{(y, x): int(g[y, x]) for y in range(h) for x in range(w)} for g in grids]
  own = [[[(y, x) for x in range(w)] for y in range(h)] for _ in range(n_img)]
  fp = collections.defaultdict(lambda: [(0, 0)])
  merges = []
  for k in range(num_merges):
    hist = collections.defaultdict(collections.Counter)  # (a, b) -> {delta: n}
    for i in range(n_img):
      pairs = set()
      for y in range(h):
        for x in range(w):
          for oy, ox in offsets:
            y2, x2 = y + oy, x + ox
            if 0 <= y2 < h and 0 <= x2 < w and own[i][y][x] != own[i][y2][x2]:
              pairs.add(tuple(sorted([own[i][y][x], own[i][y2][x2]])))
      for p, q in pairs:
        hist[(tok[i][p], tok[i][q])][(q[0] - p[0], q[1] - p[1])] += 1
    if not hist:
      break
    total = {ab: sum(c.values()) for ab, c in hist.items()}
    nmax = max(total.values())
    if nmax < min_count:
      break

    def score(ab):  # ||d - mean||^2 = ||n d - sum||^2 / n^2 in exact integers, exact sum
      c, n = hist[ab], total[ab]
      sy, sx = sum(v * d[0] for d, v in c.items()), sum(v * d[1] for d, v in c.items())
      terms = [v * math.exp(-((n * d[0] - sy) ** 2 + (n * d[1] - sx) ** 2) / n ** 2
                            / (2 * sigma ** 2)) for d, v in c.items()]
      return n / nmax + alpha * math.fsum(terms) / n

    eligible = [ab for ab in total if total[ab] >= min_count]
    a, b = max(eligible, key=lambda ab: (score(ab), total[ab], -ab[0], -ab[1]))
    delta = max(hist[(a, b)], key=lambda d: (hist[(a, b)][d], -d[0], -d[1]))
    t = base + k
    fp[t] = sorted(fp[a] + [(delta[0] + u, delta[1] + v) for u, v in fp[b]])
    merged = 0
    for i in range(n_img):
      for p in sorted(tok[i]):
        q = (p[0] + delta[0], p[1] + delta[1])
        if tok[i].get(p) == a and tok[i].get(q) == b:
          for u, v in fp[b]:
            own[i][q[0] + u][q[1] + v] = p
          del tok[i][q]
          tok[i][p] = t
          merged += 1
    merges.append((a, b, delta, total[(a, b)], merged))
  return merges


def ours(grids, base, num_merges, offsets, alpha=0.0, sigma=0.5, min_count=2):
  bpe = VisualBPE.learn(grids, base_vocab_size=base, num_merges=num_merges, alpha=alpha,
                        sigma=sigma, offsets=offsets, min_count=min_count, progress=False)
  return [(m["a"], m["b"], tuple(m["offset"]), m["count"], m["merged"]) for m in bpe.merges]


def planted(seed, n=8, h=8, w=8, base=12, noise=0.15):
  """Grids tiled with a few random 2x2 patches plus uniform noise."""
  rng = np.random.default_rng(seed)
  patches = rng.integers(0, base, (3, 2, 2))
  idx = rng.integers(0, 3, (n, h // 2, w // 2))
  g = patches[idx].transpose(0, 1, 3, 2, 4).reshape(n, h, w)
  noisy = rng.random(g.shape) < noise
  g[noisy] = rng.integers(0, base, int(noisy.sum()))
  return g.astype(np.int32)


OFFSETS = [((0, 1), (1, 0)), ((0, 1), (1, 0), (1, 1), (1, -1))]


@pytest.mark.parametrize("offsets", OFFSETS)
@pytest.mark.parametrize("seed", [0, 1])
def test_frequency_bpe_equals_reference_on_random_grids(offsets, seed):
  grids = np.random.default_rng(seed).integers(0, 4, (4, 5, 6)).astype(np.int32)
  want = brute_force(grids, 4, 12, offsets)
  assert len(want) == 12
  assert ours(grids, 4, 12, offsets) == want


@pytest.mark.parametrize("offsets", OFFSETS)
def test_frequency_bpe_equals_reference_on_planted_patches(offsets):
  grids = planted(3)
  want = brute_force(grids, 12, 15, offsets)
  got = ours(grids, 12, 15, offsets)
  assert got == want
  assert any(m[0] >= 12 and m[1] >= 12 for m in got)  # merges of merged tokens happen


@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.5), (3.0, 1.0)])
def test_priority_bpe_equals_reference(alpha, sigma):
  grids = planted(5, noise=0.3)
  offsets = OFFSETS[1]
  assert (ours(grids, 12, 10, offsets, alpha, sigma)
          == brute_force(grids, 12, 10, offsets, alpha, sigma))


@pytest.mark.parametrize("offsets", OFFSETS)
def test_long_run_with_large_footprints_equals_reference(offsets):
  grids = planted(7, n=5, h=10, w=10, noise=0.05)
  want = brute_force(grids, 12, 30, offsets, alpha=1.0)
  got = ours(grids, 12, 30, offsets, alpha=1.0)
  assert got == want
  bpe = VisualBPE.learn(grids, base_vocab_size=12, num_merges=30, alpha=1.0, offsets=offsets,
                        progress=False)
  assert max(len(bpe.footprint(t)) for t in range(12, bpe.vocab_size)) >= 8


@pytest.mark.parametrize("min_count", [1, 3])
def test_min_count_equals_reference(min_count):
  grids = planted(11, n=4, noise=0.3)
  want = brute_force(grids, 12, 25, OFFSETS[0], alpha=2.0, min_count=min_count)
  assert ours(grids, 12, 25, OFFSETS[0], alpha=2.0, min_count=min_count) == want
