"""benchmarks/probe_tokens.py and the probe: render sizes, the factored oracle, seen renderings."""

import os
import subprocess
import sys

import numpy as np
import pytest

from test_main import ROOT
from vlbpe_jax.data import shapes

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import probe_tokens  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


class _FakeVQ:
  """A 64 px, f=4 tokenizer: each patch's code from its mean colour (patch-wise), or with
  `neighbours`, also from the whole image's mean (a code that reads beyond its patch)."""
  downsample, resolution = 4, 64

  def __init__(self, neighbours=False):
    self.neighbours = neighbours

  def encode(self, images):
    n = len(images)
    patches = images.reshape(n, 16, 4, 16, 4, 3).astype(np.int64).sum((2, 4))  # [N, 16, 16, 3]
    codes = (patches[..., 0] * 7 + patches[..., 1] * 3 + patches[..., 2]) % 997
    if self.neighbours:
      codes = (codes + images.reshape(n, -1).astype(np.int64).sum(1)[:, None, None]) % 997
    return codes.astype(np.int32)


def _patch_codes(image):
  """The fake patch-wise code of an image of any size (a multiple of 4)."""
  r = image.shape[0] // 4
  p = image.reshape(r, 4, r, 4, 3).astype(np.int64).sum((1, 3))
  return ((p[..., 0] * 7 + p[..., 1] * 3 + p[..., 2]) % 997).reshape(-1)


def test_rendered_tokens_are_the_codes_of_the_smaller_render(monkeypatch):
  monkeypatch.setattr(probe_tokens.vq_tokenizer.Tokenizer, "from_workdir",
                      staticmethod(lambda workdir: _FakeVQ()))
  get, n, with_cell = probe_tokens.rendered_tokens("unused", "vq", 48, 6, num_test=3)
  assert with_cell is False  # 16 px cells: whole patches
  for split, i in (("train", 0), ("train", 5), ("test", 2)):
    image = shapes.render(shapes.make_scene(i, split), 48,
                          background=shapes.scene_background(i, split))
    np.testing.assert_array_equal(get(split, i), _patch_codes(image))
  assert get("train", 6) is None and n == 1 + max(int(get(s, i).max())
                                                  for s, m in (("train", 6), ("test", 3))
                                                  for i in range(m))
  assert probe_tokens.rendered_tokens("unused", "vq", 40, 2, num_test=1)[2] is True


@pytest.mark.parametrize("resolution,kind,vq,match", [
    (50, "vq", _FakeVQ(), "multiple of the VQ's patch 4"),
    (68, "vq", _FakeVQ(), "multiple of the VQ's patch 4 from 4 to its resolution 64"),
    (48, "oracle", _FakeVQ(), "expected bpe or vq"),
    (48, "vq", _FakeVQ(neighbours=True), "expected a patch-wise encoder"),
])
def test_rendered_tokens_refuses(monkeypatch, resolution, kind, vq, match):
  monkeypatch.setattr(probe_tokens.vq_tokenizer.Tokenizer, "from_workdir",
                      staticmethod(lambda workdir: vq))
  with pytest.raises(ValueError, match=match):
    probe_tokens.rendered_tokens("unused", kind, resolution, 2, num_test=1)


def test_questions_name_the_asked_objects_rendering_and_every_seen_one():
  tokens = lambda split, i: [i % 5] if i < 30 else None
  _, _, answers, (asked, seen) = probe_tokens.questions("train", tokens, 1000, False,
                                                           "shape")
  assert len(asked) == len(answers) > 10
  every = set()
  for i in range(30):
    bg = shapes.scene_background(i, "train")
    every.update((o["shape"], o["color"], o["size"], o["position"], bg)
                 for o in shapes.make_scene(i, "train"))
  assert seen == every and set(asked) <= every
  shape_of = {s: probe_tokens.SHAPE0 + k for k, s in enumerate(probe_tokens.SHAPES)}
  assert [shape_of[r[0]] for r in asked] == answers.tolist()
  _, _, _, (no_cell, seen_no_cell) = probe_tokens.questions(
      "train", tokens, 1000, False, "shape", with_cell=False)
  assert [r[:3] + r[4:] for r in asked] == [r[:3] + r[4:] for r in no_cell]
  assert {r[3] for r in seen_no_cell} == {None} and len(seen_no_cell) < len(seen)


def test_factored_tokens_keep_colour_apart_from_form():
  get, n, with_cell, (recipe, sizes) = probe_tokens.factored_tokens(48, 8, num_test=4)
  num_looks = (len(shapes.COLORS) + 1) * len(shapes.BACKGROUNDS)
  assert probe_tokens.NUM_LOOKS == num_looks and n % num_looks == 0
  num_forms = n // num_looks
  assert sizes == (num_looks, num_forms, 0) and recipe.shape == (n, num_looks + num_forms)
  t = 5 * num_forms + 3  # look 5, form 3: its row is look row 5 + form row 3
  assert np.flatnonzero(recipe[t]).tolist() == [5, num_looks + 3] and recipe[t].sum() == 2
  assert with_cell is False and get("train", 8) is None
  for split, i in (("train", 0), ("train", 7), ("test", 3)):
    objects = shapes.make_scene(i, split)
    background = shapes.scene_background(i, split)
    tokens = get(split, i).reshape(12, 12)
    look, form = tokens // num_forms, tokens % num_forms
    colour, bg = look // len(shapes.BACKGROUNDS), look % len(shapes.BACKGROUNDS)
    assert (bg == list(shapes.BACKGROUNDS).index(background)).all()
    for o in objects:  # each object's patches: its colour, and nowhere else
      alone = shapes.render([o], 48, background=background)
      mask = np.any(alone != shapes.BACKGROUNDS[background], -1).reshape(12, 4, 12, 4).any((1, 3))
      assert (colour[mask] == list(shapes.COLORS).index(o["color"])).all(), (split, i, o)
    empty = shapes.render([], 48, background=background)
    covered = np.any(shapes.render(objects, 48, background=background) != empty, -1)
    empty_patches = ~covered.reshape(12, 4, 12, 4).any((1, 3))
    assert (colour[empty_patches] == len(shapes.COLORS)).all()
    assert len(set(form[empty_patches].tolist())) == 1  # the empty mask: one form
    assert form[empty_patches][0] not in form[~empty_patches]
  # The same object in another colour, cell and background: other looks, the same forms.
  a = {"shape": "star", "color": "red", "size": "large", "position": "top-left"}
  b = dict(a, color="blue", position="center")
  la, fa = probe_tokens.patch_looks_and_forms(shapes.render([a], 48), "black")
  lb, fb = probe_tokens.patch_looks_and_forms(shapes.render([b], 48, background="white"),
                                                 "white")
  cells_a = [r * 12 + c for r in range(4) for c in range(4)]  # top-left cell's 4x4 patches
  cells_b = [r * 12 + c for r in range(4, 8) for c in range(4, 8)]
  assert [fa[k] for k in cells_a] == [fb[k] for k in cells_b]
  assert len({fa[k] for k in cells_a}) > 3  # a star's patches have several forms
  red, blue = list(shapes.COLORS).index("red"), list(shapes.COLORS).index("blue")
  some = [k for k in cells_a if la[k] != len(shapes.COLORS) * 3]
  assert some and all(la[k] == red * 3 + 0 for k in some)
  assert all(lb[k + 4 * 12 + 4] == blue * 3 + 2 for k in some)  # white: background index 2
  with pytest.raises(ValueError, match="expected a multiple of 4"):
    probe_tokens.factored_tokens(50, 2, num_test=1)


def test_composition_of_merged_tokens_is_the_mean_over_their_cells():
  parts = [[(0, 1, (0, 0))], [(1, 0, (0, 0)), (0, 1, (0, 1))]]  # a base token, a pair
  c, sizes = probe_tokens.composition(2, 3, parts)
  assert sizes == (2, 3, 2)  # two offsets: (0, 0) and (0, 1)
  np.testing.assert_allclose(c, [[1, 0, 0, 1, 0, 1, 0],
                                 [0.5, 0.5, 0.5, 0.5, 0, 0.5, 0.5]])
  c, sizes = probe_tokens.composition(2, 3, parts, joint=True)
  assert sizes == (2, 3, 1)  # one more row: form 1 at offset (0, 1)
  np.testing.assert_allclose(c, [[1, 0, 0, 1, 0, 0], [0.5, 0.5, 0.5, 0, 0, 0.5]])


@pytest.mark.parametrize("merges", [0, 6])
def test_twotone_tokens_are_the_tokenizers_codes(merges):
  from vlbpe_jax.vq import twotone  # pylint: disable=g-import-not-at-top
  get, n, with_cell, (recipe, (looks, forms, offsets)) = probe_tokens.twotone_tokens(
      48, 6, num_test=2, num_looks=8, num_forms=16, merges=merges)
  images = shapes.make_images("train", 0, 6, resolution=48)
  tok = twotone.TwoTone.fit(images, num_looks=8, num_forms=16)
  assert (looks, forms) == (tok.num_looks, tok.num_forms) == (8, 16) and with_cell is False
  assert n == 8 * 16 + merges and recipe.shape == (n, 8 + 16 + offsets)
  ids = tok.product_ids(*tok.encode(images)).reshape(6, -1)
  if not merges:
    assert offsets == 0
    for i in range(6):
      np.testing.assert_array_equal(get("train", i), ids[i])
    return
  assert offsets > 1 and all(len(get("train", i)) < 144 for i in range(6))
  for part in (recipe[:, :8], recipe[:, 8:24], recipe[:, 24:]):
    np.testing.assert_allclose(part.sum(1), 1.0, rtol=1e-6)  # a mean over each token's cells
  base = recipe[:128]  # base tokens: their own look and form, offset (0, 0)
  np.testing.assert_array_equal(base[:, :8].argmax(1), np.arange(128) // 16)
  np.testing.assert_array_equal(base[:, 8:24].argmax(1), np.arange(128) % 16)


def test_twotone_tokens_over_forms():
  get, n, _, (recipe, (looks, vocab, more)) = probe_tokens.twotone_tokens(
      48, 6, num_test=2, num_looks=8, num_forms=16, merges=6, over="forms")
  assert (looks, vocab, more) == (8, 16 + 6, 0) and recipe.shape == (n, 8 + 22)
  np.testing.assert_allclose(recipe[:, :8].sum(1), 1.0, rtol=1e-6)  # mean of the cells' looks
  np.testing.assert_array_equal(recipe[:, 8:].sum(1), 1.0)  # one form token
  seen = np.concatenate([get("train", i) for i in range(6)] + [get("test", i) for i in range(2)])
  np.testing.assert_array_equal(np.unique(seen), np.arange(n))  # ids numbered as first met
  # Distinct ids are distinct (form token, looks) pairs.
  assert len({tuple(r) for r in recipe}) == n
  with pytest.raises(ValueError, match="over='pixels': expected 'codes' or 'forms'"):
    probe_tokens.twotone_tokens(48, 2, num_test=1, merges=2, over="pixels")


def _probe(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "lm_colour_probe.py"),
                         *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_probe_runs_on_merged_twotone_tokens_and_refuses_a_factored_embedding_of_others():
  # (factored_tokens go through the same recipe: test_factored_tokens_keep_colour_apart...)
  proc = _probe("--tokens=twotone", "--merges=8", "--embed=factored", "--question=shape",
                "--scenes=all", "--steps=21", "--num_train=40", "--batch=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "two-tone tokens at 48 px:" in proc.stdout and "visual BPE over them: 8 merges" in (
      proc.stdout) and "test shape accuracy, asked" in proc.stdout
  proc = _probe("--tokens=oracle", "--embed=factored")
  assert proc.returncode != 0
  assert "--embed=factored with --tokens=oracle: expected --tokens=factored" in proc.stderr
  for bad, message in ((("--tokens=oracle", "--merges=8"), "expected --tokens=twotone"),
                       (("--tokens=twotone", "--joint"), "and > 0 for --joint or --bpe_over"),
                       (("--tokens=twotone", "--merges=8", "--joint", "--bpe_over=forms"),
                        "--joint with --bpe_over=forms: expected --bpe_over=codes")):
    proc = _probe(*bad)
    assert proc.returncode != 0 and message in proc.stderr, (bad, proc.stderr[-2000:])
  proc = _probe("--tokens=oracle", "--steps=20")
  assert proc.returncode != 0 and "--steps=20: expected more than the 20" in proc.stderr


def test_the_token_module_defines_no_flags():
  # tests import probe_tokens beside vlbpe_jax.main; a flag defined at import (lm_colour_probe's
  # --workdir) made main's import fail in the same pytest worker.
  from absl import flags  # pylint: disable=g-import-not-at-top
  assert not flags.FLAGS.flags_by_module_dict().get(probe_tokens.__name__)
  assert "lm_colour_probe" not in sys.modules
