"""Safetensors import (taming / HF Chameleon layouts) against numpy references in NCHW/OIHW."""

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from vlbpe_jax.vq import convert
from vlbpe_jax.vq import layers
from vlbpe_jax.vq import model as model_lib

CH, MULT, NRB, ZC, EMB, V, GROUPS = 8, (1, 2, 2), 1, 16, 8, 32, 4


def _torch_state_dict(rng, with_decoder=True):
  """Keys and PyTorch shapes as taming's Encoder/Decoder constructors create them."""
  sd = {}

  def conv(name, c_in, c_out, k):
    sd[f"{name}.weight"] = rng.normal(0, 0.2, (c_out, c_in, k, k)).astype(np.float32)
    sd[f"{name}.bias"] = rng.normal(0, 0.1, (c_out,)).astype(np.float32)

  def norm(name, c):
    sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, (c,)).astype(np.float32)
    sd[f"{name}.bias"] = rng.normal(0, 0.1, (c,)).astype(np.float32)

  def resblock(name, c_in, c_out):
    norm(f"{name}.norm1", c_in)
    conv(f"{name}.conv1", c_in, c_out, 3)
    norm(f"{name}.norm2", c_out)
    conv(f"{name}.conv2", c_out, c_out, 3)
    if c_in != c_out:
      conv(f"{name}.nin_shortcut", c_in, c_out, 1)

  def attn(name, c):
    norm(f"{name}.norm", c)
    for n in ("q", "k", "v", "proj_out"):
      conv(f"{name}.{n}", c, c, 1)

  conv("encoder.conv_in", 3, CH, 3)
  in_mult = (1,) + MULT
  for i in range(len(MULT)):
    block_in = CH * in_mult[i]
    for j in range(NRB):
      resblock(f"encoder.down.{i}.block.{j}", block_in, CH * MULT[i])
      block_in = CH * MULT[i]
    if i != len(MULT) - 1:
      conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
  c = CH * MULT[-1]
  resblock("encoder.mid.block_1", c, c)
  attn("encoder.mid.attn_1", c)
  resblock("encoder.mid.block_2", c, c)
  norm("encoder.norm_out", c)
  conv("encoder.conv_out", c, ZC, 3)
  conv("quant_conv", ZC, EMB, 1)
  sd["quantize.embedding.weight"] = rng.normal(size=(V, EMB)).astype(np.float32)
  if with_decoder:
    conv("post_quant_conv", EMB, ZC, 1)
    conv("decoder.conv_in", ZC, c, 3)
    resblock("decoder.mid.block_1", c, c)
    attn("decoder.mid.attn_1", c)
    resblock("decoder.mid.block_2", c, c)
    block_in = c
    for i in reversed(range(len(MULT))):
      for j in range(NRB + 1):
        resblock(f"decoder.up.{i}.block.{j}", block_in, CH * MULT[i])
        block_in = CH * MULT[i]
      if i != 0:
        conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, 3, 3)
    sd["loss.discriminator.main.0.weight"] = np.zeros((4, 3, 4, 4), np.float32)  # skipped
  return sd


def _np_conv_nchw(x, w, b, pad):
  """Direct NCHW / OIHW cross-correlation, stride 1."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  n, _, hh, ww = x.shape
  o, _, k, _ = w.shape
  out = np.zeros((n, o, hh - k + 1, ww - k + 1))
  for dy in range(k):
    for dx in range(k):
      out += np.einsum("nchw,oc->nohw", x[:, :, dy:dy + out.shape[2], dx:dx + out.shape[3]],
                       w[:, :, dy, dx])
  return out + b[None, :, None, None]


def _np_group_norm_nchw(x, groups, gamma, beta, eps=1e-6):
  n, c, h, w = x.shape
  g = x.reshape(n, groups, c // groups, h, w)
  mean = g.mean(axis=(2, 3, 4), keepdims=True)
  var = g.var(axis=(2, 3, 4), keepdims=True)
  g = (g - mean) / np.sqrt(var + eps)
  return g.reshape(n, c, h, w) * gamma[None, :, None, None] + beta[None, :, None, None]


def _np_attn_nchw(x, sd, name, groups):
  """taming AttnBlock.forward in NCHW."""
  h = _np_group_norm_nchw(x, groups, sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"])
  q, k, v = (_np_conv_nchw(h, sd[f"{name}.{n}.weight"], sd[f"{name}.{n}.bias"], 0)
             for n in ("q", "k", "v"))
  b, c, hh, ww = q.shape
  q = q.reshape(b, c, hh * ww).transpose(0, 2, 1)  # b, hw, c
  k = k.reshape(b, c, hh * ww)  # b, c, hw
  w_ = np.einsum("bic,bcj->bij", q, k) * c ** -0.5
  w_ = np.exp(w_ - w_.max(axis=2, keepdims=True))
  w_ /= w_.sum(axis=2, keepdims=True)
  v = v.reshape(b, c, hh * ww)
  h = np.einsum("bcj,bij->bci", v, w_).reshape(b, c, hh, ww)
  return x + _np_conv_nchw(h, sd[f"{name}.proj_out.weight"], sd[f"{name}.proj_out.bias"], 0)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  rng = np.random.default_rng(0)
  sd = _torch_state_dict(rng)
  path = str(tmp_path_factory.mktemp("ckpt") / "taming.safetensors")
  save_file(sd, path)
  model = model_lib.VQModel("mu", codebook_size=V, code_dim=EMB, l2_normalize=False)
  return sd, path, model, convert.load_params(path, model, resolution=16)


def test_taming_layout_loads_with_right_shapes(loaded):
  sd, _, _, params = loaded
  k = params["encoder"]["down_0_block_0"]["conv1"]["kernel"]
  assert k.shape == (3, 3, CH, CH)
  np.testing.assert_array_equal(k, sd["encoder.down.0.block.0.conv1.weight"].transpose(2, 3, 1, 0))
  assert params["decoder"]["up_2_upsample"]["conv"]["kernel"].shape == (3, 3, 16, 16)
  np.testing.assert_array_equal(params["quantize"]["embedding"], sd["quantize.embedding.weight"])
  np.testing.assert_array_equal(params["encoder"]["norm_out"]["scale"],
                                sd["encoder.norm_out.weight"])


def test_conv_groupnorm_attention_match_numpy_nchw(loaded):
  sd, _, _, params = loaded
  rng = np.random.default_rng(1)
  x_nchw = rng.normal(size=(2, 3, 8, 8))
  x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1), jnp.float32)
  # conv_in: 3x3, padding 1.
  got = layers.conv(CH, 3).apply({"params": params["encoder"]["conv_in"]}, x)
  want = _np_conv_nchw(x_nchw, sd["encoder.conv_in.weight"], sd["encoder.conv_in.bias"], 1)
  np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  # GroupNorm (norm1 of the first block, 8 channels in 4 groups).
  h_nchw = rng.normal(1.0, 2.0, size=(2, CH, 8, 8))
  h = jnp.asarray(h_nchw.transpose(0, 2, 3, 1), jnp.float32)
  p = params["encoder"]["down_0_block_0"]["norm1"]
  got = layers.group_norm(GROUPS, None).apply({"params": p}, h)
  want = _np_group_norm_nchw(h_nchw, GROUPS, sd["encoder.down.0.block.0.norm1.weight"],
                             sd["encoder.down.0.block.0.norm1.bias"])
  np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  # Mid attention block (16 channels at 4x4).
  a_nchw = rng.normal(size=(2, 16, 4, 4))
  a = jnp.asarray(a_nchw.transpose(0, 2, 3, 1), jnp.float32)
  got = layers.AttnBlock(groups=GROUPS).apply(
      {"params": params["encoder"]["mid_attn_1"]}, a)
  want = _np_attn_nchw(a_nchw, sd, "encoder.mid.attn_1", GROUPS)
  np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def test_full_model_runs_on_imported_weights(loaded):
  _, _, model, params = loaded
  x = jnp.zeros((1, 16, 16, 3))
  codes = model.apply({"params": params}, x, method=model.encode)
  assert codes.shape == (1, 4, 4)
  assert model.apply({"params": params}, codes, method=model.decode).shape == (1, 16, 16, 3)


def test_chameleon_layout_encoder_only(tmp_path):
  sd = _torch_state_dict(np.random.default_rng(2), with_decoder=False)
  hf = {f"model.vqmodel.{k}": v for k, v in sd.items()}
  hf["model.embed_tokens.weight"] = np.zeros((4, 4), np.float32)  # the LM: skipped
  path = str(tmp_path / "chameleon.safetensors")
  save_file(hf, path)
  assert convert.detect_layout(hf) == "chameleon"
  model = model_lib.VQModel("mu", codebook_size=V, code_dim=EMB, l2_normalize=False)
  params = convert.load_params(path, model, resolution=16, encoder_only=True)
  assert set(params) == {"encoder", "quant_conv", "quantize"}
  np.testing.assert_array_equal(params["quant_conv"]["kernel"][0, 0],
                                sd["quant_conv.weight"][:, :, 0, 0].T)
  with pytest.raises(ValueError, match="decoder/conv_in/kernel: missing"):
    convert.load_params(path, model, resolution=16)


def test_mismatch_lists_every_problem(tmp_path):
  sd = _torch_state_dict(np.random.default_rng(3))
  sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"][:4]
  del sd["decoder.norm_out.bias"]
  path = str(tmp_path / "bad.safetensors")
  save_file(sd, path)
  model = model_lib.VQModel("mu", codebook_size=V, code_dim=EMB, l2_normalize=False)
  with pytest.raises(ValueError) as e:
    convert.load_params(path, model, resolution=16)
  assert "encoder/conv_in/kernel: shape (3, 3, 3, 4)" in str(e.value)
  assert "decoder/norm_out/bias: missing" in str(e.value)
  with pytest.raises(ValueError, match="layout"):
    convert.detect_layout({"foo.weight": 0})
