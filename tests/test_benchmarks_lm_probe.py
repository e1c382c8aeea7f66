"""benchmarks/lm_colour_probe.py: scenes rendered at another size, the seen-rendering split."""

import os
import sys

import numpy as np
import pytest

from test_main import ROOT
from vlbpe_jax.data import shapes

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import lm_colour_probe  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


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
  monkeypatch.setattr(lm_colour_probe.vq_tokenizer.Tokenizer, "from_workdir",
                      staticmethod(lambda workdir: _FakeVQ()))
  get, n, with_cell = lm_colour_probe.rendered_tokens("unused", "vq", 48, 6, num_test=3)
  assert with_cell is False  # 16 px cells: whole patches
  for split, i in (("train", 0), ("train", 5), ("test", 2)):
    image = shapes.render(shapes.make_scene(i, split), 48,
                          background=shapes.scene_background(i, split))
    np.testing.assert_array_equal(get(split, i), _patch_codes(image))
  assert get("train", 6) is None and n == 1 + max(int(get(s, i).max())
                                                  for s, m in (("train", 6), ("test", 3))
                                                  for i in range(m))
  assert lm_colour_probe.rendered_tokens("unused", "vq", 40, 2, num_test=1)[2] is True


@pytest.mark.parametrize("resolution,kind,vq,match", [
    (50, "vq", _FakeVQ(), "multiple of the VQ's patch 4"),
    (68, "vq", _FakeVQ(), "multiple of the VQ's patch 4 from 4 to its resolution 64"),
    (48, "oracle", _FakeVQ(), "expected bpe or vq"),
    (48, "vq", _FakeVQ(neighbours=True), "expected a patch-wise encoder"),
])
def test_rendered_tokens_refuses(monkeypatch, resolution, kind, vq, match):
  monkeypatch.setattr(lm_colour_probe.vq_tokenizer.Tokenizer, "from_workdir",
                      staticmethod(lambda workdir: vq))
  with pytest.raises(ValueError, match=match):
    lm_colour_probe.rendered_tokens("unused", kind, resolution, 2, num_test=1)


def test_questions_name_the_asked_objects_rendering_and_every_seen_one():
  tokens = lambda split, i: [i % 5] if i < 30 else None
  _, _, answers, (asked, seen) = lm_colour_probe.questions("train", tokens, 1000, False,
                                                           "shape")
  assert len(asked) == len(answers) > 10
  every = set()
  for i in range(30):
    bg = shapes.scene_background(i, "train")
    every.update((o["shape"], o["color"], o["size"], o["position"], bg)
                 for o in shapes.make_scene(i, "train"))
  assert seen == every and set(asked) <= every
  shape_of = {s: lm_colour_probe.SHAPE0 + k for k, s in enumerate(lm_colour_probe.SHAPES)}
  assert [shape_of[r[0]] for r in asked] == answers.tolist()
  _, _, _, (no_cell, seen_no_cell) = lm_colour_probe.questions(
      "train", tokens, 1000, False, "shape", with_cell=False)
  assert [r[:3] + r[4:] for r in asked] == [r[:3] + r[4:] for r in no_cell]
  assert {r[3] for r in seen_no_cell} == {None} and len(seen_no_cell) < len(seen)
