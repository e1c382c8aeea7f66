"""VisualBPE: the S term, round trips, determinism over meshes, save/load, bad inputs, CLIs."""

import hashlib
import json
import math
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from vlbpe_jax import fileio
from vlbpe_jax import parallel
from vlbpe_jax.bpe import VisualBPE
from vlbpe_jax.bpe import counting
from vlbpe_jax.bpe import decode as decode_cli
from vlbpe_jax.bpe import encode as encode_cli
from vlbpe_jax.bpe import grid_state
from vlbpe_jax.bpe import learner
from vlbpe_jax.bpe import learn as learn_cli
from vlbpe_jax.bpe import model as model_lib
from vlbpe_jax.bpe import scoring
from vlbpe_jax.bpe import sharded_counting
from vlbpe_jax.bpe import tables
from vlbpe_jax.bpe import visualize
from vlbpe_jax.bpe import vocab as vocab_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def patch_grids(seed=0, n=16, h=12, w=12, base=32, noise=0.1):
  """Grids tiled with 4 fixed random 3x3 patches (codes < 24) plus noise over [0, 24)."""
  patches = np.random.default_rng(0).integers(0, 24, (4, 3, 3))
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, 4, (n, h // 3, w // 3))
  g = patches[idx].transpose(0, 1, 3, 2, 4).reshape(n, h, w)
  noisy = rng.random(g.shape) < noise
  g[noisy] = rng.integers(0, 24, int(noisy.sum()))
  return g.astype(np.int32)


def consistent_vs_scattered():
  """One 12x12 grid of distinct filler codes holding (3, 4) four times at offset (0, 1) and
  (1, 2) four times, twice at (0, 1) and twice at (1, 0): equal counts, different S."""
  g = np.arange(100, 244, dtype=np.int32).reshape(1, 12, 12)
  for y in (0, 3, 6, 9):
    g[0, y, 0:2] = (3, 4)
  for y, x in ((0, 6), (3, 6)):
    g[0, y, x:x + 2] = (1, 2)
  for y, x in ((6, 6), (6, 9)):
    g[0, y:y + 2, x] = (1, 2)
  return g


def test_kernel_matches_formula():
  hists = [[(0, 1, 3), (1, 0, 1)], [(0, 1, 2), (1, -1, 2)], [(2, -1, 5)],
           [(0, 1, 4), (1, 1, 2), (2, 0, 1), (0, 3, 1)]]  # (dy, dx, n) per offset
  group = np.concatenate([np.full(len(h), k) for k, h in enumerate(hists)])
  dy, dx, n = (np.array([e[i] for h in hists for e in h]) for i in range(3))
  s = scoring.score_histograms(group, dy, dx, n, len(hists), 0.7)
  for k, h in enumerate(hists):
    u = [(a, b) for a, b, c in h for _ in range(c)]
    my, mx = np.mean([a for a, _ in u]), np.mean([b for _, b in u])
    want = np.mean([math.exp(-((a - my) ** 2 + (b - mx) ** 2) / (2 * 0.7 ** 2)) for a, b in u])
    assert s[k] == pytest.approx(want, rel=1e-6)
  assert s[2] == 1.0 and s[0] > s[1]
  # The same shape shifted, mirrored or transposed (and listed in another order) ties exactly.
  moved = [[(3, 2, 2), (2, 2, 4), (4, 1, 1), (2, 4, 1)],   # shifted by (2, 1)
           [(1, 1, 2), (0, 2, 1), (1, 0, 4), (3, 0, 1)],   # transposed
           [(1, 2, 2), (0, 0, 1), (2, 3, 1), (0, 2, 4)]]   # mirrored, shifted by (0, 3)
  group = np.concatenate([np.full(len(h), k) for k, h in enumerate(moved)])
  dy, dx, n = (np.array([e[i] for h in moved for e in h]) for i in range(3))
  assert (scoring.score_histograms(group, dy, dx, n, 3, 0.7) == s[3]).all()


def test_large_merges_counted_in_slices_learn_the_same_vocabulary(monkeypatch):
  g = patch_grids(seed=5, n=40)
  kw = dict(base_vocab_size=32, num_merges=30, alpha=1.0, sigma=0.5, progress=False)
  want = VisualBPE.learn(g, **kw)
  monkeypatch.setattr(learner, "MERGE_SLICE", 7)  # the first merges take hundreds of anchors
  got = VisualBPE.learn(g, **kw)
  assert max(m["merged"] for m in want.merges) > 10 * 7
  assert got.merges == want.merges


def test_threads_learn_the_vocabulary_of_one_thread(monkeypatch):
  """Shards of the grids on threads (THREAD_MIN_COUNT=1: every merge threaded, as at scale),
  with the threaded first count in small chunks, sliced merges and forced recounts over the
  shards: the merges (F, S, P included) of one thread."""
  g = patch_grids(seed=5, n=41, noise=0.2)  # 41 grids: shards of unequal size
  monkeypatch.setattr(learner, "THREAD_MIN_COUNT", 1)
  for offsets, alpha in (("0,1;1,0", 1.0), ("0,1;1,0;1,1;1,-1", 0.0)):
    kw = dict(base_vocab_size=32, num_merges=120, alpha=alpha, sigma=0.7, progress=False,
              offsets=vocab_lib.parse_offsets(offsets))
    want = VisualBPE.learn(g, **kw)
    for threads in (2, 3, 64):  # 64 > 41 grids: one shard per grid
      assert VisualBPE.learn(g, threads=threads, **kw).merges == want.merges, threads
  kw = dict(base_vocab_size=32, num_merges=150, progress=False, return_timing=True)
  want, _ = VisualBPE.learn(g, **kw)
  with monkeypatch.context() as m:
    m.setattr(learner, "KEEP_CELLS", 1)  # recounts from every shard's grids
    m.setattr(learner, "MERGE_SLICE", 14)  # 7 anchors per slice on each of 2 threads
    m.setattr(counting, "CHUNK_CELLS", 600)  # 300-cell chunks counted on 2 threads
    got, timing = VisualBPE.learn(g, threads=2, **kw)
  assert timing["recounts"] >= 2 and got.merges == want.merges
  for bad in (0, -1, 1.5):
    with pytest.raises(ValueError, match=f"threads={bad}"):
      VisualBPE.learn(g, threads=bad, **kw)


def test_pair_consistency_refuses_bad_shapes():
  ok = np.ones((3, 4))
  scoring.pair_consistency(ok.astype(int), ok, 0.5, 0.0)
  for counts, dist2, what in ((np.ones(4, int), np.ones(4), r"\(4,\)"),
                              (np.ones((3, 4), int), np.ones((3, 2)), r"\(3, 2\)"),
                              (np.ones((3, 3), int), np.ones((3, 3)), "power of two")):
    with pytest.raises(ValueError, match=what):
      scoring.pair_consistency(counts, dist2, 0.5, 0.0)


def test_fixed_offset_pair_beats_scattered_pair():
  g = consistent_vs_scattered()
  freq = VisualBPE.learn(g, base_vocab_size=244, num_merges=1, alpha=0.0, progress=False)
  prio = VisualBPE.learn(g, base_vocab_size=244, num_merges=2, alpha=1.0, sigma=0.5,
                         progress=False)
  # Equal counts: frequency BPE breaks the tie by id and takes the scattered (1, 2) ...
  assert (freq.merges[0]["a"], freq.merges[0]["b"]) == (1, 2)
  # ... the spatial term prefers the pair that always sits at (0, 1).
  first, second = prio.merges
  assert (first["a"], first["b"], first["offset"]) == (3, 4, [0, 1])
  assert first["count"] == second["count"] == 4
  assert first["S"] == 1.0
  assert second["S"] == pytest.approx(math.exp(-1.0), rel=1e-6)  # ||d - u||^2 = 1/2 each
  assert first["P"] > second["P"]


@pytest.mark.parametrize("offsets", [((0, 1), (1, 0)), ((0, 1), (1, 0), (1, 1), (1, -1))])
def test_round_trip_including_unseen_codes_and_shapes(offsets):
  bpe = VisualBPE.learn(patch_grids(), base_vocab_size=32, num_merges=40, alpha=1.0,
                        offsets=offsets, progress=False)
  assert len(bpe.merges) == 40
  rng = np.random.default_rng(1)
  tests = [patch_grids(seed=2, n=5), rng.integers(0, 32, (6, 7, 9)).astype(np.int32),
           rng.integers(24, 32, (2, 3, 4)).astype(np.int32)]  # codes never seen in training
  for g in tests:
    enc = bpe.encode(g)
    np.testing.assert_array_equal(bpe.decode(enc), g)
    n, width = enc["tokens"].shape
    assert enc["positions"].shape == (n, width, 2)
    np.testing.assert_array_equal(enc["cells"].sum(1), np.full(n, g.shape[1] * g.shape[2]))
    valid = np.arange(width)[None] < enc["lengths"][:, None]
    assert (enc["tokens"][~valid] == -1).all() and (enc["tokens"][valid] >= 0).all()
    raster = enc["positions"][..., 0] * g.shape[2] + enc["positions"][..., 1]
    assert all((np.diff(raster[i, :enc["lengths"][i]]) > 0).all() for i in range(n))
  planted = bpe.encode(patch_grids(seed=2, n=5))
  assert planted["lengths"].mean() < 0.5 * 144  # the planted patches compress


def test_encoding_training_grids_replays_learning():
  g = patch_grids(seed=4)
  bpe = VisualBPE.learn(g, base_vocab_size=32, num_merges=30, progress=False)
  tok = bpe.encode(g)["tokens"]
  counts = np.bincount(tok[tok >= 32] - 32, minlength=30)
  # Each merged token's final count = times it was made - times later merges consumed it.
  used = np.zeros(30, np.int64)
  for m in bpe.merges:
    for t in (m["a"], m["b"]):
      if t >= 32:
        used[t - 32] += m["merged"]
  made = np.array([m["merged"] for m in bpe.merges])
  np.testing.assert_array_equal(counts, made - used)


def test_deterministic_across_runs_and_device_counts():
  g = patch_grids(seed=5, n=13, noise=0.25)  # 13 grids: padded to split over 8 devices
  kw = dict(base_vocab_size=32, num_merges=25, alpha=2.0, sigma=0.8,
            offsets=((0, 1), (1, 0), (1, 1)), progress=False)
  single = VisualBPE.learn(g, **kw).to_dict()
  assert VisualBPE.learn(g, **kw).to_dict() == single
  assert len(jax.devices()) == 8
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh([("data", -1)], devices)
    assert VisualBPE.learn(g, mesh=mesh, **kw).to_dict() == single
  mesh = parallel.make_mesh([("data", 4), ("fsdp", 2)])
  assert VisualBPE.learn(g, mesh=mesh, **kw).to_dict() == single


def test_save_load(tmp_path):
  g = patch_grids(seed=6)
  bpe = VisualBPE.learn(g, base_vocab_size=32, num_merges=20, alpha=0.5, progress=False)
  path = str(tmp_path / "bpe.json")
  bpe.save(path)
  d = json.load(open(path))
  assert d["merges"][0].keys() >= {"a", "b", "offset", "F", "S", "P", "footprint", "count"}
  back = VisualBPE.load(path)
  assert back.to_dict() == bpe.to_dict()
  enc = back.encode(g)
  for k, v in bpe.encode(g).items():
    np.testing.assert_array_equal(enc[k], v)
  d["merges"][3]["footprint"] = [[0, 0]]
  json.dump(d, open(path, "w"))
  with pytest.raises(ValueError, match="footprint"):
    VisualBPE.load(path)


def test_bad_inputs_raise():
  g = patch_grids()
  with pytest.raises(ValueError, match="dtype"):
    VisualBPE.learn(g.astype(np.float32), base_vocab_size=32, num_merges=2)
  with pytest.raises(ValueError, match="negative"):
    VisualBPE.learn(g - 1, base_vocab_size=32, num_merges=2)
  with pytest.raises(ValueError, match="base_vocab_size=20"):
    VisualBPE.learn(g, base_vocab_size=20, num_merges=2)
  with pytest.raises(ValueError, match="shape"):
    VisualBPE.learn(g[0], base_vocab_size=32, num_merges=2)
  with pytest.raises(ValueError, match="raster-forward"):
    VisualBPE.learn(g, base_vocab_size=32, num_merges=2, offsets=((0, -1),))
  with pytest.raises(ValueError, match="alpha"):
    VisualBPE.learn(g, base_vocab_size=32, num_merges=2, alpha=-1.0)
  bpe = VisualBPE.learn(g, base_vocab_size=32, num_merges=5, progress=False)
  with pytest.raises(ValueError, match="base_vocab_size=32"):
    bpe.encode(np.full((1, 4, 4), 32, np.int32))
  enc = bpe.encode(g[:2])
  enc["tokens"] = np.where(enc["tokens"] >= 0, 99, -1)
  with pytest.raises(ValueError, match="vocabulary"):
    bpe.decode(enc)  # tokens of a bigger vocabulary
  with pytest.raises(ValueError, match="merge 0"):
    VisualBPE(32, [dict(a=40, b=1, offset=[0, 1])])


def test_token_map_picture(tmp_path):
  g = patch_grids(seed=7, n=3)
  bpe = VisualBPE.learn(g, base_vocab_size=32, num_merges=20, progress=False)
  maps = visualize.token_maps(bpe, g, scale=4)
  assert maps.shape == (3, 48, 48, 3) and maps.dtype == np.uint8
  fig = visualize.token_map_figure(bpe, g, images=np.zeros((3, 20, 20, 3), np.uint8), scale=4)
  assert fig.dtype == np.uint8 and fig.shape[1] == 48 * 2 + 4
  visualize.save_png(fig, str(tmp_path / "map.png"))
  assert (tmp_path / "map.png").stat().st_size > 0
  # Cells of one token share a colour; a base code (unmerged) is grey.
  state = bpe.tokenize(g)
  cell_tok = state.tok[state.own].reshape(g.shape)
  y, x = np.argwhere(cell_tok[0] < 32)[0]
  assert (maps[0, 4 * y + 2, 4 * x + 2] == 140).all()


def test_clis_in_process(tmp_path, capsys):
  g = patch_grids(seed=8)
  codes, out = str(tmp_path / "codes.npy"), str(tmp_path / "bpe.json")
  np.save(codes, g)
  res = learn_cli.main([f"--codes={codes}", "--merges=12", "--alpha=1", "--sigma=0.5",
                        f"--out={out}", "--base_vocab_size=32", "--no_progress",
                        "--offsets=0,1;1,0;1,1"])
  assert res["merges"] == 12 and json.loads(capsys.readouterr().out.strip())["merges"] == 12
  tokens, back = str(tmp_path / "tokens.npz"), str(tmp_path / "back.npy")
  assert encode_cli.main([f"--bpe={out}", f"--codes={codes}", f"--out={tokens}"])[
      "cells_per_token"] > 1
  decode_cli.main([f"--bpe={out}", f"--tokens={tokens}", f"--out={back}"])
  np.testing.assert_array_equal(np.load(back), g)


def test_the_bpe_clis_learn_encode_and_decode_without_importing_jax(tmp_path):
  # bpe/ is numpy: a data-loading worker or a host learning merges needs no jax (~130 MB).
  codes = str(tmp_path / "codes.npy")
  np.save(codes, patch_grids(seed=3, n=8))
  out, tokens, back = (str(tmp_path / f) for f in ("b.json", "t.npz", "back.npy"))
  script = (
      "import sys\n"
      "from vlbpe_jax.bpe import decode, encode, learn\n"
      f"learn.main(['--codes={codes}', '--merges=6', '--out={out}', '--no_progress'])\n"
      f"encode.main(['--bpe={out}', '--codes={codes}', '--out={tokens}', '--processes=2',"
      " '--chunk=3'])\n"
      f"decode.main(['--bpe={out}', '--tokens={tokens}', '--out={back}'])\n"
      "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'chex'))\n"
      "assert not loaded, loaded\n")
  env = {k: v for k, v in os.environ.items() if k != "VLBPE_DISTRIBUTED"}
  subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=ROOT)
  np.testing.assert_array_equal(np.load(back), np.load(codes))


def test_sharded_first_counts_equal_host_counts():
  g = patch_grids(seed=9, n=11, noise=0.3)
  offsets = ((0, 1), (1, 0), (1, -1))
  want = counting.count_base_pairs_host(g, offsets, 40)
  for mesh in (None, parallel.make_mesh([("data", -1)]),
               parallel.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])):
    got = sharded_counting.count_base_pairs(g, offsets, 40, mesh)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
  assert want[1].sum() == 11 * (11 * 12 + 12 * 11 + 11 * 11)
  # A capacity whose pair codes overflow int32 on the host (int64 path) gives the same counts.
  big = counting.count_base_pairs_host(g * 997, offsets, 40000)
  np.testing.assert_array_equal(big[0],
                                sharded_counting.count_base_pairs(g * 997, offsets, 40000)[0])
  np.testing.assert_array_equal(big[1], want[1])


def test_slot_map_lookup_insert():
  rng = np.random.default_rng(0)
  keys = np.unique(rng.integers(0, 10**12, 3000))
  m = tables.SlotMap(rng.permutation(keys[:1000]))
  slot_of = {int(k): i for i, k in enumerate(m.keys)}
  for lo, hi in ((1000, 1000), (1000, 1001), (1001, 1500), (1500, 3000)):
    batch = rng.permutation(keys[lo:hi])
    slot_of.update({int(k): int(s) for k, s in zip(batch, m.insert(batch))})
    q = np.concatenate([keys[:hi], rng.integers(0, 10**12, 200), [-1, 10**13]])
    want = [slot_of.get(int(k), -1) for k in q]
    np.testing.assert_array_equal(m.lookup(q), want)
  assert m.size == 3000 and (m.keys[list(slot_of.values())] == list(slot_of)).all()
  with pytest.raises(ValueError, match="does not exceed"):
    m.insert(keys[:1])


def test_learn_validates_codes_before_counting(tmp_path):
  g = patch_grids()
  with pytest.raises(ValueError, match=r"shape \(0, 4, 4\): expected at least 1 grid"):
    VisualBPE.learn(np.zeros((0, 4, 4), np.int32), base_vocab_size=4, num_merges=2)
  with pytest.raises(ValueError, match=r"2\*\*24"):
    VisualBPE.learn(g, base_vocab_size=2**24, num_merges=1)  # no 2**24-token tables built
  with pytest.raises(ValueError, match="base_vocab_size=32.5"):
    VisualBPE.learn(g, base_vocab_size=32.5, num_merges=1)
  with pytest.raises(ValueError,
                     match=r"holds code 1099511627\d+: expected codes < base_vocab_size=32"):
    VisualBPE.learn(g.astype(np.int64) + 2**40, base_vocab_size=32, num_merges=1)
  cases = {"empty": np.zeros((0, 4, 4), np.int32), "huge": np.full((2, 4, 4), 2**40),
           "negative": np.full((2, 4, 4), -3, np.int32), "flat": np.zeros(5, np.int32)}
  want = {"empty": "at least 1 grid", "huge": r"code 1099511627776: expected codes < 16777216",
          "negative": r"negative code -3: expected codes in \[0, 16777216\)",
          "flat": r"shape \(5,\): expected \[N, H, W\]"}
  for name, codes in cases.items():
    path = str(tmp_path / f"{name}.npy")
    np.save(path, codes)
    with pytest.raises(ValueError, match=want[name]) as e:
      learn_cli.main([f"--codes={path}", "--merges=2", f"--out={tmp_path}/b.json",
                      "--no_progress"])
    assert path in str(e.value)
  (tmp_path / "torn.npy").write_bytes(open(tmp_path / "huge.npy", "rb").read()[:100])
  with pytest.raises(ValueError, match="torn.npy"):
    learn_cli.main([f"--codes={tmp_path}/torn.npy", "--merges=2", f"--out={tmp_path}/b.json"])


def _saved_vocabulary(tmp_path):
  bpe = VisualBPE.learn(patch_grids(seed=3), base_vocab_size=32, num_merges=6, progress=False)
  path = str(tmp_path / "bpe.json")
  bpe.save(path)
  return bpe, path


@pytest.mark.parametrize("edit,field", [
    (lambda d: json.dumps(d)[:200], "not valid JSON"),
    (lambda d: [d], "JSON list"),
    (lambda d: (d.pop("merges"), d)[1], r"missing field\(s\) \['merges'\]"),
    (lambda d: d.update(base_vocab_size="32") or d, "base_vocab_size='32'"),
    (lambda d: d.update(base_vocab_size=2**40) or d, "base_vocab_size=1099511627776"),
    (lambda d: d.update(alpha="high") or d, "alpha='high'"),
    (lambda d: d.update(min_count=2.5) or d, "min_count=2.5"),
    (lambda d: d.update(offsets=[[0, 1], [1]]) or d, "offsets"),
    (lambda d: d.update(merges={"a": 1}) or d, "merges of type dict"),
    (lambda d: d["merges"][2].update(a=33.7) or d, r"merge 2 \(token 34\): a=33.7"),
    (lambda d: d["merges"][2].update(a=True) or d, r"merge 2 \(token 34\): a=True"),
    (lambda d: d["merges"][1].update(b=33) or d, r"merge 1 \(token 33\): b=33"),
    (lambda d: d["merges"][1].update(id=40) or d, r"merge 1 \(token 33\): id=40"),
    (lambda d: d["merges"][0].update(offset=[0, -1]) or d, "raster-forward"),
    (lambda d: d["merges"][0].update(offset=[0]) or d, r"offset=\[0\]"),
    (lambda d: d["merges"][0].update(a=d["merges"][0]["b"], offset=[0, 0]) or d,
     "raster-forward"),
    (lambda d: (d["merges"][3].pop("a"), d)[1], r"merge 3 .*expected a dict with keys a, b"),
    (lambda d: d["merges"][3].update(count=1.5) or d, r"merge 3 \(token 35\) field 'count'"),
    (lambda d: d.update(vocab_size=99) or d, "vocab_size"),
])
def test_load_refuses_bad_files_naming_file_and_field(tmp_path, edit, field):
  _, path = _saved_vocabulary(tmp_path)
  d = json.load(open(path))
  out = edit(d)
  open(path, "w").write(out if isinstance(out, str) else json.dumps(out))
  with pytest.raises(ValueError, match=field) as e:
    VisualBPE.load(path)
  assert path in str(e.value)


def test_merge_footprints_must_not_overlap():
  a = dict(a=0, b=1, offset=[0, 1])
  VisualBPE(4, [a, dict(a=4, b=4, offset=[0, 2])])
  with pytest.raises(ValueError, match="overlap"):
    VisualBPE(4, [a, dict(a=4, b=4, offset=[0, 1])])


def test_save_is_atomic(tmp_path, monkeypatch):
  bpe, path = _saved_vocabulary(tmp_path)
  before = open(path).read()
  bigger = VisualBPE.learn(patch_grids(seed=3), base_vocab_size=32, num_merges=9,
                           progress=False)

  def crash(*args):
    raise OSError("simulated crash before the rename")
  monkeypatch.setattr("os.replace", crash)
  with pytest.raises(OSError, match="simulated"):
    bigger.save(path)
  assert open(path).read() == before and len(VisualBPE.load(path).merges) == 6
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe.json"]  # no temporary left


def test_decode_cli_checks_the_vocabulary_digest_and_names_torn_files(tmp_path):
  g = patch_grids(seed=8)
  bpe, path = _saved_vocabulary(tmp_path)
  codes, tokens = str(tmp_path / "codes.npy"), str(tmp_path / "tokens.npz")
  np.save(codes, g)
  encode_cli.main([f"--bpe={path}", f"--codes={codes}", f"--out={tokens}"])
  assert len(str(np.load(tokens)["bpe_digest"])) == 16
  decode_cli.main([f"--bpe={path}", f"--tokens={tokens}", f"--out={tmp_path}/back.npy"])
  np.testing.assert_array_equal(np.load(tmp_path / "back.npy"), g)
  # The stage's layout (bpe_digest saved by vlbpe_jax.bpe.stage), then an edited vocabulary.
  np.savez(tokens, bpe_digest=np.array(fileio.short_digest(path)), **bpe.encode(g))
  d = json.load(open(path))
  d["merges"][-1]["offset"] = [1, 0]
  d["merges"][-1].pop("footprint")
  json.dump(d, open(path, "w"))
  with pytest.raises(ValueError, match="digest") as e:
    decode_cli.main([f"--bpe={path}", f"--tokens={tokens}", f"--out={tmp_path}/x.npy"])
  assert tokens in str(e.value) and path in str(e.value)
  (tmp_path / "torn.npz").write_bytes(open(tokens, "rb").read()[:200])
  with pytest.raises(ValueError, match="torn.npz"):
    decode_cli.main([f"--bpe={path}", f"--tokens={tmp_path}/torn.npz", f"--out={tmp_path}/x"])
  enc = bpe.encode(g)
  np.savez(tokens, **dict(enc, tokens=enc["tokens"].astype(np.float32)))
  with pytest.raises(ValueError, match=r"tokens.npz: encoding\['tokens'\] has dtype float32"):
    decode_cli.main([f"--bpe={path}", f"--tokens={tokens}", f"--out={tmp_path}/x.npy"])


# Small-sample correction of S (issue 12, defect 7): S_k = S * N / (N + k).

def _merges_digest(bpe):
  return hashlib.sha256(json.dumps(bpe.merges, sort_keys=True).encode()).hexdigest()[:16]


def test_s_prior_count_shrinks_rare_pairs():
  # One offset seen twice vs the same shape seen 1000 times; a two-offset shape likewise.
  group, dy, dx = np.array([0, 1, 2, 2, 3, 3]), np.array([0, 0, 0, 1, 0, 1]), np.array(
      [1, 1, 1, 0, 1, 0])
  n = np.array([2, 1000, 1, 1, 500, 500])
  plain = scoring.score_histograms(group, dy, dx, n, 4, 0.5)
  assert plain[0] == plain[1] == 1.0 and plain[2] == plain[3]  # k = 0: sample size ignored
  np.testing.assert_array_equal(scoring.score_histograms(group, dy, dx, n, 4, 0.5, 0.0), plain)
  for k in (1.0, 8.0):
    s = scoring.score_histograms(group, dy, dx, n, 4, 0.5, k)
    assert s[0] < s[1] and s[2] < s[3]
    np.testing.assert_allclose(s, plain * np.array([2, 1000, 2, 1000]) /
                               (np.array([2, 1000, 2, 1000]) + k), rtol=1e-6)


def test_s_prior_count_zero_keeps_merges_and_alpha_zero_ignores_it():
  g = patch_grids(seed=8, n=24, noise=0.3)
  kw = dict(base_vocab_size=32, num_merges=40, sigma=0.5, progress=False)
  # The digest of the merges learned before the correction existed (commit 1463bbd).
  assert _merges_digest(VisualBPE.learn(g, alpha=4.0, s_prior_count=0, **kw)) == (
      "13f38f9d3a78e042")
  assert _merges_digest(VisualBPE.learn(g, alpha=4.0, **kw)) == "13f38f9d3a78e042"
  shrunk = VisualBPE.learn(g, alpha=4.0, s_prior_count=8, **kw)
  assert _merges_digest(shrunk) != "13f38f9d3a78e042"
  assert all(m["S"] <= m["count"] / (m["count"] + 8) * (1 + 1e-6) for m in shrunk.merges)
  freq = [VisualBPE.learn(g, alpha=0.0, s_prior_count=k, **kw).merges for k in (0, 8)]
  drop = lambda ms: [{k: v for k, v in m.items() if k not in ("S", "P")} for m in ms]
  assert drop(freq[0]) == drop(freq[1])


def test_s_prior_count_saved_loaded_and_validated(tmp_path):
  g = patch_grids(seed=6)
  bpe = VisualBPE.learn(g, base_vocab_size=32, num_merges=10, s_prior_count=2.5,
                        progress=False)
  path = str(tmp_path / "bpe.json")
  bpe.save(path)
  back = VisualBPE.load(path)
  assert back.s_prior_count == 2.5 and back.to_dict() == bpe.to_dict()
  d = json.load(open(path))
  del d["s_prior_count"]  # a file written before the field existed: learned with k = 0
  json.dump(d, open(path, "w"))
  assert VisualBPE.load(path).s_prior_count == 0.0
  for bad in (-1.0, float("nan"), float("inf"), "2", True):
    with pytest.raises(ValueError, match="s_prior_count"):
      VisualBPE.learn(g, base_vocab_size=32, num_merges=2, s_prior_count=bad)
  for bad in (-1, "2", None):
    d["s_prior_count"] = bad
    json.dump(d, open(path, "w"))
    with pytest.raises(ValueError, match="s_prior_count") as e:
      VisualBPE.load(path)
    assert path in str(e.value)
  codes = str(tmp_path / "codes.npy")
  np.save(codes, g)
  out = str(tmp_path / "cli.json")
  learn_cli.main([f"--codes={codes}", "--merges=4", f"--out={out}", "--base_vocab_size=32",
                  "--no_progress", "--s_prior_count=3"])
  assert VisualBPE.load(out).s_prior_count == 3.0
  with pytest.raises(ValueError, match="s_prior_count=-2"):
    learn_cli.main([f"--codes={codes}", "--merges=4", f"--out={out}", "--no_progress",
                    "--s_prior_count=-2"])


def test_memory_lean_paths_learn_the_vocabulary_of_commit_9eb430a(monkeypatch):
  """The merge lists that the learner of commit 9eb430a (int64 tables, one-shot first count and
  argsort) learned on this corpus: digests of the integer fields (pairs, offsets, counts) as
  9eb430a learned them, and of the whole lists (F, S, P included) with today's numpy S kernel
  (9eb430a's jitted kernel gave other last bits of S under other XLA flags, e.g. the tests'
  -O0). Tiny chunks force the chunked first count (several chunks and code ranges) and the
  chunked base-code index."""
  g = patch_grids(seed=3, n=40, noise=0.2)
  want = {"0,1;1,0": ("53b34135445adec5", "d000fc683648387d"),
          "0,1;1,0;1,1;1,-1": ("0f9eca5abb700027", "109e2b4bf8a685e7")}

  def digest(merges):
    return hashlib.sha256(json.dumps(merges, sort_keys=True).encode()).hexdigest()[:16]

  for chunks in ((0, 0), (300, 97)):
    if chunks[0]:
      monkeypatch.setattr(counting, "CHUNK_CELLS", chunks[0])
      monkeypatch.setattr(grid_state, "_INDEX_CHUNK", chunks[1])
    for offsets, (d_ints, d_all) in want.items():
      bpe = VisualBPE.learn(g, base_vocab_size=32, num_merges=80, progress=False,
                            offsets=vocab_lib.parse_offsets(offsets))
      ints = [{k: v for k, v in m.items() if k not in ("F", "S", "P")} for m in bpe.merges]
      assert len(bpe.merges) == 80 and digest(ints) == d_ints, (chunks, offsets)
      assert digest(bpe.merges) == d_all, (chunks, offsets)
  # Token ids >= 2**15 (int32 tokens, int64 pair keys): the same merges up to the id shift.
  wide = VisualBPE.learn(g + 50000, base_vocab_size=50032, num_merges=80, progress=False)
  narrow = VisualBPE.learn(g, base_vocab_size=32, num_merges=80, progress=False)
  for m, n in zip(wide.merges, narrow.merges):
    assert m["a"] - 50000 == n["a"] and m["b"] - 50000 == n["b"]
    assert (m["offset"], m["count"], m["F"], m["S"]) == (n["offset"], n["count"], n["F"], n["S"])


def test_first_count_chunks_and_min_count_pruning():
  g = patch_grids(seed=5, n=30, noise=0.3)
  offsets = ((0, 1), (1, 0), (1, -1))
  keys, counts = counting.count_base_pairs_host(g, offsets, 40)
  for chunk_cells in (144, 500, 10**6):
    k2, c2 = counting.count_base_pairs_host(g, offsets, 40, chunk_cells=chunk_cells)
    np.testing.assert_array_equal(k2, keys)
    np.testing.assert_array_equal(c2, counts)
    k3, c3 = counting.count_base_pairs_host(g, offsets, 40, min_count=3,
                                            chunk_cells=chunk_cells)
    ab = keys // (12 * 23)
    total = {int(p): int(counts[ab == p].sum()) for p in np.unique(ab)}
    live = np.array([total[int(p)] >= 3 for p in ab])
    np.testing.assert_array_equal(k3, keys[live])
    np.testing.assert_array_equal(c3, counts[live])


# The fork of the encoding workers: jax warns at a fork once its backends run; the workers
# run numpy only.
@pytest.mark.filterwarnings("ignore:os.fork")
def test_encode_in_chunks_threads_and_processes_equals_one_batch(monkeypatch):
  g = patch_grids(seed=7, n=37)
  bpe = VisualBPE.learn(g, base_vocab_size=32, num_merges=30, progress=False)
  want = bpe.encode(g, chunk=1000)
  for chunk, threads, processes in ((5, 1, 1), (8, 3, 1), (36, 2, 1), (0, 4, 1), (5, 1, 2),
                                    (4, 1, 3), (0, 1, 2), (1, 1, 5)):
    got = bpe.encode(g, chunk=chunk, threads=threads, processes=processes)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
      assert got[k].dtype == want[k].dtype
  with pytest.raises(ValueError, match="threads=0"):
    bpe.encode(g, threads=0)
  with pytest.raises(ValueError, match="processes=0"):
    bpe.encode(g, processes=0)
  with pytest.raises(ValueError, match="threads=2, processes=2"):
    bpe.encode(g, threads=2, processes=2)
  monkeypatch.setattr(model_lib.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
  with pytest.raises(ValueError, match="processes=2: worker processes are forked"):
    bpe.encode(g, chunk=5, processes=2)


@pytest.mark.filterwarnings("ignore:os.fork")  # the child writes numpy memory, then os._exit
def test_encode_outputs_are_private_writable_arrays_that_outlive_the_call():
  # The padded outputs live in their own anonymous mappings (`model._empty`: no huge-page
  # hint); they must behave as np.empty's would: writable, C-contiguous, independent of each
  # other, pickled by value, and private: a forked child's writes never reach the parent.
  g = patch_grids(seed=7, n=9)
  bpe = VisualBPE.learn(g, base_vocab_size=32, num_merges=20, progress=False)
  enc, again = bpe.encode(g), bpe.encode(g)
  for k in ("tokens", "positions", "cells"):
    a = enc[k]
    assert a.flags.writeable and a.flags.c_contiguous and a.dtype == np.int32, k
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(a)), a)
  enc["tokens"][:] = -7
  assert (again["tokens"] != -7).any()
  pid = os.fork()
  if pid == 0:  # the child writes, then leaves without pytest's clean-up
    again["tokens"][:] = 123
    os._exit(0)
  os.waitpid(pid, 0)
  assert not (again["tokens"] == 123).any()
  np.testing.assert_array_equal(bpe.decode(again), g)
  assert model_lib._empty((0, 5), np.int32).shape == (0, 5)


def encoding_digests() -> dict:
  """sha256 (16 hex digits) of `encode`'s arrays for two vocabularies (int16 and int32 token
  ids) on grids of 144 and of 256 (a power of two) cells."""
  out = {}
  offsets = ((0, 1), (1, 0), (1, -1), (1, 1))
  g = patch_grids(seed=11, n=40, noise=0.2)
  big = patch_grids(seed=13, n=12, h=18, w=18)[:, :16, :16]
  for name, scale, base in (("int16", 1, 32), ("int32", 997, 40000)):
    bpe = VisualBPE.learn(g * scale, base_vocab_size=base, num_merges=60, alpha=1.0,
                          offsets=offsets, progress=False)
    assert any(m["a"] == m["b"] for m in bpe.merges)  # chains of one token merge too
    for part, grids in (("12x12", patch_grids(seed=12, n=50, noise=0.2) * scale),
                        ("16x16", big * scale)):
      enc = bpe.encode(grids)
      h = hashlib.sha256()
      for k in ("tokens", "positions", "cells", "lengths", "grid_shape"):
        h.update(np.ascontiguousarray(enc[k], np.int32).tobytes())
      out[f"{name}/{part}"] = h.hexdigest()[:16]
  return out


def test_encoding_is_the_one_of_the_encoder_before_its_speed_up():
  # Pinned from the encoder of 11b4151 (owners kept, bounds before the token test, one chunk,
  # padded outputs concatenated): the faster one must give the same arrays to the bit.
  assert encoding_digests() == {
      "int16/12x12": "cde614ffdd6ae400", "int16/16x16": "caf5db52aaa0e0b9",
      "int32/12x12": "e4be3afd0c4fc184", "int32/16x16": "bda138c98c3e8e50"}


def test_grid_state_without_owners_tokenizes_alike_and_refuses_owner_queries():
  g = patch_grids(seed=5, n=9, noise=0.2)
  bpe = VisualBPE.learn(g, base_vocab_size=32, num_merges=40, progress=False)
  full, lean = bpe.tokenize(g), bpe.tokenize(g, owners=False)
  np.testing.assert_array_equal(lean.tok, full.tok)
  assert lean.own is None and lean.idx == np.int64 and full.idx == np.int32
  with pytest.raises(ValueError, match="owners: this GridState keeps no owners"):
    lean.owners(np.arange(3))
  with pytest.raises(ValueError, match="neighbours: this GridState keeps no owners"):
    lean.neighbours(np.flatnonzero(lean.tok >= 0)[:3], 0)


@pytest.mark.parametrize("base", [40, 70000])
def test_base_index_is_a_stable_argsort_in_every_layout(monkeypatch, base):
  tok = np.random.default_rng(base).integers(0, base, 5000).astype(
      np.int16 if base < 2**15 else np.int32)
  want = np.argsort(tok, kind="stable")
  for chunk in (64, 1000, 1 << 20):
    monkeypatch.setattr(grid_state, "_INDEX_CHUNK", chunk)
    for idx in (np.int32, np.int64):
      order, start = grid_state._base_index(tok, base, idx)
      assert order.dtype == idx
      np.testing.assert_array_equal(order, want)
      np.testing.assert_array_equal(np.diff(start), np.bincount(tok, minlength=base))


def test_int16_grids_learn_the_same_vocabulary(tmp_path):
  g = patch_grids(seed=4)
  want = VisualBPE.learn(g, base_vocab_size=32, num_merges=20, progress=False)
  assert VisualBPE.learn(g.astype(np.int16), base_vocab_size=32, num_merges=20,
                         progress=False).merges == want.merges
  codes, out = str(tmp_path / "codes.npy"), str(tmp_path / "bpe.json")
  np.save(codes, g)  # int32 file; the CLI learns from an int16 copy
  learn_cli.main([f"--codes={codes}", "--merges=20", f"--out={out}", "--base_vocab_size=32",
                  "--no_progress"])
  assert VisualBPE.load(out).merges == want.merges


def test_learn_cli_threads(tmp_path, monkeypatch):
  """`--threads=3` (every merge threaded) writes the one-thread vocabulary and reports its
  threads; the default is `learner.default_threads`; a negative count is named."""
  g = patch_grids(seed=4)
  codes, out = str(tmp_path / "codes.npy"), str(tmp_path / "bpe.json")
  np.save(codes, g)
  args = [f"--codes={codes}", "--merges=20", f"--out={out}", "--base_vocab_size=32",
          "--no_progress"]
  want = learn_cli.main(args)
  assert want["threads"] == learner.default_threads(g.size) == 1  # 2304 cells
  want = VisualBPE.load(out).merges
  monkeypatch.setattr(learner, "THREAD_MIN_COUNT", 1)
  assert learn_cli.main(args + ["--threads=3"])["threads"] == 3
  assert VisualBPE.load(out).merges == want
  with pytest.raises(ValueError, match="--threads=-1"):
    learn_cli.main(args + ["--threads=-1"])


def test_storage_threshold_recounts_give_the_same_vocabulary(monkeypatch):
  """A storage threshold far above the winning counts forces recounts from the grids (the
  pool floor drops below it); merges, counts, F, S and P must not change."""
  g = patch_grids(seed=3, n=40, noise=0.2)
  for offsets in ("0,1;1,0", "0,1;1,0;1,1;1,-1"):
    kw = dict(base_vocab_size=32, num_merges=150, progress=False, return_timing=True,
              offsets=vocab_lib.parse_offsets(offsets))
    want, timing = VisualBPE.learn(g, **kw)
    assert timing["recounts"] == 0
    with monkeypatch.context() as m:
      m.setattr(learner, "KEEP_CELLS", 1)  # keep = number of cells (5760)
      got, timing = VisualBPE.learn(g, **kw)
    assert timing["recounts"] >= 2 and got.merges == want.merges
