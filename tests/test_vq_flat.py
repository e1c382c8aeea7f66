"""Flat regions: the local encoder codes a constant region with one code; the metric counts it."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from vlbpe_jax.vq import metrics
from vlbpe_jax.vq import model as model_lib


def _scene(bg, obj, at):
  """uint8 [32, 32, 3]: background `bg` with an 8x8 square of colour `obj` at pixel `at`."""
  img = np.zeros((32, 32, 3), np.uint8) + np.array(bg, np.uint8)
  img[at[0]:at[0] + 8, at[1]:at[1] + 8] = obj
  return img


def _encode(variant, images):
  model = model_lib.VQModel(variant, codebook_size=64, code_dim=8)
  x = images.astype(np.float32) / 127.5 - 1.0
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x[:1]))["params"]
  z = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_latent))(params, x)
  codes = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, x)
  return np.asarray(z), np.asarray(codes)


def _flat_cells_z(images, z):
  """The encoder outputs of every cell whose 3x3 patch neighbourhood is background (f=4)."""
  out = []
  for img, zz in zip(images, z):
    bg = np.all(img == img[0, 0], -1).reshape(8, 4, 8, 4).all((1, 3))
    for y in range(1, 7):
      for x in range(1, 7):
        if bg[y - 1:y + 2, x - 1:x + 2].all():
          out.append(zz[y, x])
  return np.stack(out)


@pytest.mark.parametrize("variant", ["tiny_p4_local", "tiny_p4_patch"])
def test_local_encoder_codes_a_flat_background_alike_across_images(variant):
  # One background, the object elsewhere in each image. Taming's encoder (GroupNorm statistics,
  # attention over the whole image) moves the background's features with the object; the local
  # encoder reads only its 12x12-pixel neighbourhood, so every flat cell gets the same vector.
  images = np.stack([_scene((120, 120, 120), c, at) for c, at in
                     [((220, 30, 30), (0, 0)), ((40, 80, 230), (20, 20)),
                      ((245, 225, 40), (0, 24)), ((250, 130, 200), (24, 0))]])
  z_local, codes_local = _encode(variant, images)
  flat = _flat_cells_z(images, z_local)
  np.testing.assert_allclose(flat, np.broadcast_to(flat[0], flat.shape), atol=1e-5)
  stats = metrics.flat_region_codes(images, codes_local, min_cells=1)
  assert stats[(120, 120, 120)]["codes"] == 1
  z_global, _ = _encode("tiny_p4", images)
  flat_global = _flat_cells_z(images, z_global)
  assert np.abs(flat_global - flat_global[0]).max() > 1e-3  # the global encoder's spread


def test_flat_region_codes_counts_codes_and_shares():
  images = np.zeros((2, 20, 20, 3), np.uint8)  # f=4: 5x5 grid, inner 3x3
  images[1] = 255
  images[1, :4, :4] = 7  # a non-background corner patch: cell (0, 0) is not flat...
  codes = np.zeros((2, 5, 5), np.int32)
  codes[0, 1:4, 1:4] = [[1, 1, 1], [1, 2, 1], [1, 1, 1]]  # 9 flat black cells, 2 codes
  codes[1] = 5
  out = metrics.flat_region_codes(images, codes, min_cells=1)
  assert out[(0, 0, 0)] == dict(cells=9, codes=2, top_share=8 / 9)
  # ...and neither is inner cell (1, 1), whose neighbourhood touches it: 8 white flat cells.
  assert out[(255, 255, 255)] == dict(cells=8, codes=1, top_share=1.0)
  assert (0, 0, 0) not in metrics.flat_region_codes(images, codes, min_cells=10)


@pytest.mark.parametrize("shape", [(2, 5, 5), (2, 3, 4), (1, 5, 5)])
def test_flat_region_codes_refuses_codes_that_do_not_tile(shape):
  images = np.zeros((2, 20, 20, 3), np.uint8)
  codes = np.zeros(shape, np.int32)
  if shape == (2, 5, 5):
    images = images[..., :2]
  with pytest.raises(ValueError, match="expected"):
    metrics.flat_region_codes(images, codes)
