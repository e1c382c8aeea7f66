"""vq/twotone.py: the two-tone product tokenizer (a look x a form per patch)."""

import numpy as np
import pytest

from vlbpe_jax.data import shapes
from vlbpe_jax.vq import twotone


def _scenes(n, resolution=48, split="train"):
  return shapes.make_images(split, 0, n, resolution=resolution)


def test_shapes_renders_round_trip_exactly():
  images = _scenes(24)
  tok = twotone.TwoTone.fit(images, num_looks=256, num_forms=1024)
  looks, forms = tok.encode(images)
  assert looks.shape == forms.shape == (24, 12, 12) and looks.dtype == np.int32
  np.testing.assert_array_equal(tok.decode(looks, forms), images)
  ids = tok.product_ids(looks, forms)
  np.testing.assert_array_equal(ids // tok.num_forms, looks)
  np.testing.assert_array_equal(ids % tok.num_forms, forms)


def test_a_form_does_not_depend_on_the_colours():
  star = dict(shape="star", size="large", position="center")
  red = shapes.render([dict(star, color="red")], 48, background="black")
  blue = shapes.render([dict(star, color="blue")], 48, background="white")
  tok = twotone.TwoTone.fit(np.stack([red, blue]), num_looks=8, num_forms=64)
  (lr, lb), (fr, fb) = tok.encode(np.stack([red, blue]))
  np.testing.assert_array_equal(fr, fb)
  assert len(np.unique(fr)) > 3  # the star's edge has several forms
  inside = fr != 0  # patches with an edge: red-on-black looks there, blue-on-white elsewhere
  assert inside.any() and not np.array_equal(lr[inside], lb[inside])


def test_the_minority_side_is_one_and_ties_put_pixel_0_on_the_zero_side():
  p = np.zeros((1, 4, 8, 3), np.uint8)
  p[0, 0, 1] = 200  # left patch: one bright pixel on black; right: black and white halves
  p[0, :, 4:6] = 255
  looks, forms = twotone.split_patches(twotone.patches(p, 4))
  left, right = forms[0, 0]
  assert left.sum() == 1 and left.reshape(4, 4)[0, 1]
  np.testing.assert_allclose(looks[0, 0, 0], [200, 200, 200, 0, 0, 0])
  assert right.sum() == 8 and not right[0]  # pixel 0 (white) on the 0 side
  np.testing.assert_allclose(looks[0, 0, 1], [0, 0, 0, 255, 255, 255])
  inverted = 255 - p
  _, forms_inv = twotone.split_patches(twotone.patches(inverted, 4))
  np.testing.assert_array_equal(forms_inv, forms)  # swapping the colours keeps the form
  flat = np.full((1, 4, 4, 3), 77, np.uint8)
  looks, forms = twotone.split_patches(twotone.patches(flat, 4))
  assert not forms.any() and np.allclose(looks, 77)


def test_bitmaps_outside_the_codebook_take_the_nearest():
  tok = twotone.TwoTone(looks=np.array([[255] * 3 + [0] * 3], np.float32),
                        forms=np.array([[0] * 16, [1] * 4 + [0] * 12, [1] * 8 + [0] * 8], bool),
                        patch=4)
  image = np.zeros((1, 4, 4, 3), np.uint8)
  image[0, 0, :3] = 255  # three bright pixels: Hamming 1 from the second entry
  assert tok.encode(image)[1][0, 0] == 1
  image[0, 1, :3] = 255  # six: Hamming 2 from the third
  assert tok.encode(image)[1][0, 0] == 2


def test_kmeans_keeps_few_points_and_finds_separated_clusters():
  points = np.array([[0.0, 0.0], [5.0, 5.0]])
  np.testing.assert_array_equal(twotone.kmeans(points, np.ones(2), 4), points)
  rng = np.random.default_rng(0)
  centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
  points = np.concatenate([c + rng.normal(size=(50, 2)) for c in centres])
  found = twotone.kmeans(points, np.ones(len(points)), 3)
  np.testing.assert_allclose(np.sort(found[:, 0] + 3 * found[:, 1]),
                             np.sort(centres[:, 0] + 3 * centres[:, 1]), atol=1.0)


def test_save_and_load(tmp_path):
  tok = twotone.TwoTone.fit(_scenes(4), num_looks=16, num_forms=32)
  tok.save(tmp_path / "twotone.npz")
  back = twotone.TwoTone.load(tmp_path / "twotone.npz")
  np.testing.assert_array_equal(back.looks, tok.looks)
  np.testing.assert_array_equal(back.forms, tok.forms)
  assert back.patch == 4 and back.forms.dtype == bool
  np.savez(tmp_path / "other.npz", looks=tok.looks)
  with pytest.raises(ValueError, match=r"other.npz: no \['forms', 'patch'\]; expected a file"):
    twotone.TwoTone.load(tmp_path / "other.npz")


def test_bad_inputs():
  images = _scenes(2)
  with pytest.raises(ValueError, match="dtype float32: expected uint8"):
    twotone.TwoTone.fit(images.astype(np.float32))
  with pytest.raises(ValueError, match=r"shape \(2, 48, 48\): expected \[B, H, W, 3\]"):
    twotone.TwoTone.fit(images[..., 0])
  with pytest.raises(ValueError, match="48x48 px: expected multiples of patch=5"):
    twotone.TwoTone.fit(images, patch=5)
  with pytest.raises(ValueError, match="num_looks=0"):
    twotone.TwoTone.fit(images, num_looks=0)
  tok = twotone.TwoTone.fit(images, num_looks=4, num_forms=8)
  looks, forms = tok.encode(images)
  with pytest.raises(ValueError, match=r"form ids in \[8, 8\]: expected \[0, 8\)"):
    tok.decode(looks, np.full_like(forms, 8))
  with pytest.raises(ValueError, match="expected the same shape"):
    tok.product_ids(looks, forms[:1])
  with pytest.raises(ValueError, match=r"forms of shape \(8, 9\), patch=4: expected looks"):
    twotone.TwoTone(tok.looks, np.zeros((8, 9), bool), 4)
  with pytest.raises(ValueError, match="values other than 0 and 1: expected bitmaps"):
    twotone.TwoTone(tok.looks, np.full((8, 16), 2), 4)
