"""VQ model modules: shapes, dtypes, determinism, encode/decode == training path, losses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from vlbpe_jax.vq import autoencoder
from vlbpe_jax.vq import discriminator
from vlbpe_jax.vq import losses
from vlbpe_jax.vq import metrics
from vlbpe_jax.vq import model as model_lib
from vlbpe_jax.vq import perceptual


@pytest.fixture(scope="module")
def mu():
  model = model_lib.VQModel("mu", codebook_size=32, code_dim=8, l2_normalize=True)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x))["params"]
  return model, params, x


def test_shapes_and_downsample(mu):
  model, params, x = mu
  x_rec, aux = jax.jit(model.apply)({"params": params}, x)
  assert x_rec.shape == x.shape and x_rec.dtype == jnp.float32
  assert aux["codes"].shape == (2, 4, 4) and aux["codes"].dtype == jnp.int32
  assert aux["z_e"].shape == (2, 4, 4, 8)
  assert model.downsample == 4
  assert params["quantize"]["embedding"].shape == (32, 8)
  assert "mid_attn_1" in params["encoder"] and "mid_attn_1" in params["decoder"]


def test_encode_decode_is_the_training_path(mu):
  model, params, x = mu
  x_rec, aux = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  codes = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, x)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(aux["codes"]))
  dec = jax.jit(lambda p, c: model.apply({"params": p}, c, method=model.decode))(params, codes)
  np.testing.assert_allclose(np.asarray(dec), np.asarray(x_rec), rtol=1e-5, atol=1e-5)


def test_same_key_same_params_and_bf16_runs():
  x = jnp.zeros((1, 16, 16, 3))
  m32 = model_lib.VQModel("mu", 16, 4)
  init = jax.jit(m32.init)
  a = init(jax.random.key(3), x)
  b = init(jax.random.key(3), x)
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)),
               nn.unbox(a), nn.unbox(b))
  m16 = model_lib.VQModel("mu", 16, 4, dtype=jnp.bfloat16)
  out, aux = jax.jit(m16.apply)(a, x)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  assert aux["codes"].dtype == jnp.int32


def test_params_carry_logical_names(mu):
  model, _, x = mu
  boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  k = boxed["encoder"]["conv_in"]["kernel"]
  assert k.names == ("conv_h", "conv_w", "conv_in", "conv_out")
  assert boxed["decoder"]["conv_out"]["kernel"].names[-1] is None  # 3 RGB channels
  assert boxed["quantize"]["embedding"].names == ("codebook", "code_dim")


def test_unknown_variant_raises():
  with pytest.raises(ValueError, match="variant='nope' unknown"):
    autoencoder.decode_variant("nope")
  with pytest.raises(ValueError, match="disc_variant"):
    discriminator.make_discriminator("nope")
  with pytest.raises(ValueError, match="recon_loss"):
    losses.reconstruction(jnp.zeros(2), jnp.zeros(2), "l3")


def test_discriminator_and_gan_losses():
  d = discriminator.make_discriminator("tiny")
  x = jnp.zeros((2, 32, 32, 3))
  params = jax.jit(d.init)(jax.random.key(0), x)
  logits = jax.jit(d.apply)(params, x)
  assert logits.shape == (2, 6, 6, 1)
  real, fake = jnp.asarray([2.0, 0.5]), jnp.asarray([-2.0, 0.0])
  assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
  assert float(losses.hinge_g_loss(fake)) == pytest.approx(1.0)
  w = losses.adaptive_weight({"a": jnp.asarray([3.0, 4.0])}, {"b": jnp.asarray([0.5])})
  assert float(w) == pytest.approx(5.0 / (0.5 + 1e-4))


def test_psnr_ssim_against_numpy():
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32)
  mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(metrics.psnr(a, b)), 10 * np.log10(1 / mse), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(metrics.ssim(a, a)), 1.0, rtol=1e-5)
  # Constant images: SSIM reduces to the luminance term (2 mu_x mu_y + c1) / (mu_x^2+mu_y^2+c1).
  c1 = 0.01 ** 2
  want = (2 * 0.3 * 0.6 + c1) / (0.09 + 0.36 + c1)
  got = metrics.ssim(np.full((1, 16, 16, 1), 0.3, np.float32), np.full((1, 16, 16, 1), 0.6,
                                                                         np.float32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)
  assert float(metrics.ssim(a, b)[0]) < 0.99


def test_perceptual_loads_file_and_refuses_missing(tmp_path):
  rng = np.random.default_rng(0)
  widths = (4, 4, 6, 6, 8, 8, 8, 8, 8, 8, 8, 8, 8)  # VGG16 layout, narrow (test only)
  tensors, c_in = {}, 3
  for i, c in zip(perceptual.VGG16_CONVS, widths):  # small random stand-in, test only
    tensors[f"features.{i}.weight"] = rng.normal(0, 0.05, (c, c_in, 3, 3)).astype(np.float32)
    tensors[f"features.{i}.bias"] = np.zeros(c, np.float32)
    c_in = c
  for k, c in enumerate((4, 6, 8, 8, 8)):
    tensors[f"lin{k}.model.1.weight"] = np.abs(rng.normal(size=(1, c, 1, 1))).astype(np.float32)
  path = str(tmp_path / "lpips.safetensors")
  save_file(tensors, path)
  params = perceptual.load_lpips(path)
  x = jax.random.uniform(jax.random.key(0), (1, 32, 32, 3), minval=-1, maxval=1)
  assert float(perceptual.lpips(params, x, x)[0]) == pytest.approx(0.0, abs=1e-6)
  assert float(perceptual.lpips(params, x, -x)[0]) > 0
  del tensors["lin4.model.1.weight"]
  save_file(tensors, path)
  with pytest.raises(ValueError, match="lin4.model.1.weight"):
    perceptual.load_lpips(path)
  with pytest.raises(ValueError, match="no such file"):
    perceptual.load_lpips(str(tmp_path / "missing.safetensors"))


def test_space_to_depth_round_trip_and_patch_variant():
  x = jax.random.uniform(jax.random.key(2), (2, 8, 12, 3))
  s = autoencoder.space_to_depth(x, 4)
  assert s.shape == (2, 2, 3, 48)
  np.testing.assert_array_equal(np.asarray(s[1, 1, 2]),
                                np.asarray(x[1, 4:8, 8:12].reshape(-1)))  # row-major block
  np.testing.assert_array_equal(np.asarray(autoencoder.depth_to_space(s, 4)), np.asarray(x))
  for name, sizes in autoencoder.VARIANTS.items():
    want = sizes.get("patch", 1) * 2 ** (len(sizes["ch_mult"]) - 1)
    assert model_lib.VQModel(name).downsample == want == autoencoder.downsample_factor(name)
