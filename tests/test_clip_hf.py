"""Hugging Face CLIPModel import/export vs an independent numpy forward of OpenAI CLIP."""

import json
import math
import os

import jax
import numpy as np
import pytest
import safetensors.numpy as stn

from vlbpe_jax.clip import hf
from vlbpe_jax.clip import layers

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=4, num_channels=3, hidden_act="quick_gelu",
              layer_norm_eps=1e-5)
TEXT = dict(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=10, hidden_act="quick_gelu",
            layer_norm_eps=1e-5)
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)


def random_clip(seed=0):
  """HF tensor names and [out, in] shapes of transformers' CLIPModel, random values."""
  rng = np.random.default_rng(seed)
  normal = lambda scale, *shape: rng.normal(0, scale, shape)  # noqa: E731
  w = {}
  for tower, c in (("vision_model", VISION), ("text_model", TEXT)):
    d, f = c["hidden_size"], c["intermediate_size"]
    for i in range(c["num_hidden_layers"]):
      p = f"{tower}.encoder.layers.{i}."
      for n in ("q", "k", "v", "out"):
        w[p + f"self_attn.{n}_proj.weight"] = normal(0.3, d, d)
        w[p + f"self_attn.{n}_proj.bias"] = normal(0.1, d)
      for n in ("layer_norm1", "layer_norm2"):
        w[p + f"{n}.weight"], w[p + f"{n}.bias"] = 1 + normal(0.1, d), normal(0.1, d)
      w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"] = normal(0.3, f, d), normal(0.1, f)
      w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"] = normal(0.3, d, f), normal(0.1, d)
  dv, dt, p = VISION["hidden_size"], TEXT["hidden_size"], VISION["patch_size"]
  grid = VISION["image_size"] // p
  w["vision_model.embeddings.patch_embedding.weight"] = normal(0.2, dv, 3, p, p)
  w["vision_model.embeddings.class_embedding"] = normal(1.0, dv)
  w["vision_model.embeddings.position_embedding.weight"] = normal(0.5, grid * grid + 1, dv)
  for name in ("vision_model.pre_layrnorm", "vision_model.post_layernorm"):
    w[name + ".weight"], w[name + ".bias"] = 1 + normal(0.1, dv), normal(0.1, dv)
  w["text_model.embeddings.token_embedding.weight"] = normal(1.0, TEXT["vocab_size"], dt)
  w["text_model.embeddings.position_embedding.weight"] = normal(0.5, 10, dt)
  w["text_model.final_layer_norm.weight"] = 1 + normal(0.1, dt)
  w["text_model.final_layer_norm.bias"] = normal(0.1, dt)
  w["visual_projection.weight"] = normal(0.3, 16, dv)
  w["text_projection.weight"] = normal(0.3, 16, dt)
  w["logit_scale"] = np.array(2.5)
  return {k: np.asarray(v, np.float32) for k, v in w.items()}


def write_clip(path, tensors, act="quick_gelu"):
  os.makedirs(path, exist_ok=True)
  config = dict(model_type="clip", projection_dim=16,
                vision_config=dict(VISION, hidden_act=act), text_config=dict(TEXT, hidden_act=act))
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(config, fh)
  with open(os.path.join(path, "preprocessor_config.json"), "w") as fh:
    json.dump(dict(image_mean=list(MEAN), image_std=list(STD)), fh)
  stn.save_file(tensors, os.path.join(path, "model.safetensors"))
  return path


# ---------------------------------------------------------------- numpy OpenAI CLIP forward
def _ln(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _act(x, act):
  if act == "quick_gelu":
    return x / (1 + np.exp(-1.702 * x))
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_layer(w, p, x, heads, act, causal):
  lin = lambda h, n: h @ w[p + n + ".weight"].T + w[p + n + ".bias"]  # noqa: E731
  b, t, d = x.shape
  k = d // heads
  h = _ln(x, w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"])
  q, kk, v = (lin(h, f"self_attn.{n}_proj").reshape(b, t, heads, k).transpose(0, 2, 1, 3)
              for n in "qkv")
  s = q @ kk.transpose(0, 1, 3, 2) / math.sqrt(k)  # [B, N, T, S]
  if causal:
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
  x = x + lin(o, "self_attn.out_proj")
  h = _ln(x, w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"])
  return x + lin(_act(lin(h, "mlp.fc1"), act), "mlp.fc2")


def np_vision(w, images, act):
  """images [B, R, R, 3] in [-1, 1] -> (last hidden [B, 1 + g*g, D], image_embeds [B, E])."""
  px = (((images + 1) / 2 - np.array(MEAN)) / np.array(STD)).transpose(0, 3, 1, 2)  # NCHW
  conv = w["vision_model.embeddings.patch_embedding.weight"]  # [D, 3, P, P]
  d, _, p, _ = conv.shape
  b, _, r, _ = px.shape
  g = r // p
  patches = px.reshape(b, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
  x = patches @ conv.reshape(d, -1).T  # [B, g*g, D], row-major grid as torch's flatten(2)
  cls = np.broadcast_to(w["vision_model.embeddings.class_embedding"], (b, 1, d))
  x = np.concatenate([cls, x], 1) + w["vision_model.embeddings.position_embedding.weight"]
  x = _ln(x, w["vision_model.pre_layrnorm.weight"], w["vision_model.pre_layrnorm.bias"])
  for i in range(VISION["num_hidden_layers"]):
    x = np_layer(w, f"vision_model.encoder.layers.{i}.", x, VISION["num_attention_heads"], act,
                 causal=False)
  pooled = _ln(x[:, 0], w["vision_model.post_layernorm.weight"],
               w["vision_model.post_layernorm.bias"])
  return x, pooled @ w["visual_projection.weight"].T


def np_text(w, ids, act):
  """ids [B, T] (EOT = the largest id, then 0) -> text_embeds [B, E], pooled at argmax(ids)."""
  x = w["text_model.embeddings.token_embedding.weight"][ids]
  x = x + w["text_model.embeddings.position_embedding.weight"][:ids.shape[1]]
  for i in range(TEXT["num_hidden_layers"]):
    x = np_layer(w, f"text_model.encoder.layers.{i}.", x, TEXT["num_attention_heads"], act,
                 causal=True)
  x = _ln(x, w["text_model.final_layer_norm.weight"], w["text_model.final_layer_norm.bias"])
  return x[np.arange(len(ids)), ids.argmax(-1)] @ w["text_projection.weight"].T


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_load_clip_matches_numpy_reference(tmp_path, act):
  w = random_clip()
  model, params = hf.load_clip(write_clip(str(tmp_path / "ckpt"), w, act))
  c = model.config
  assert (c.width, c.text_width, c.embed_dim, c.act) == (32, 24, 16, act)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  ids = np.array([[3, 7, 49, 0, 0, 0], [5, 9, 11, 4, 49, 0]], np.int32)  # EOT 49 = max id
  hidden, img_ref = np_vision(w, images, act)
  apply = jax.jit(lambda *a, method: model.apply({"params": params}, *a, method=method),
                  static_argnames="method")
  np.testing.assert_allclose(apply(images, method="encode_image"), img_ref, atol=1e-5, rtol=1e-5)
  feats = apply(images, method="patch_features")  # [B, 4, 4, D]
  np.testing.assert_allclose(feats, hidden[:, 1:].reshape(2, 4, 4, 32), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(apply(ids, method="encode_text"), np_text(w, ids, act),
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(params["logit_scale"], 2.5)
  # One vision block alone.
  x = np.random.default_rng(2).normal(0, 1, (2, 5, 32)).astype(np.float32)
  block = layers.Block(4, 48, act, causal=False, depth=2)
  y = jax.jit(block.apply)({"params": params["visual"]["transformer"]["blocks_1"]}, x)
  np.testing.assert_allclose(y, np_layer(w, "vision_model.encoder.layers.1.", x, 4, act, False),
                             atol=1e-5, rtol=1e-5)


def test_save_clip_round_trip(tmp_path):
  w = random_clip(seed=3)
  w["text_model.embeddings.position_ids"] = np.arange(10)[None]  # an old buffer: ignored
  model, params = hf.load_clip(write_clip(str(tmp_path / "a"), w))
  assert model.config.image_mean == MEAN and model.config.image_std == STD
  hf.save_clip(model.config, params, str(tmp_path / "b"))
  saved = stn.load_file(str(tmp_path / "b" / "model.safetensors"))
  del w["text_model.embeddings.position_ids"]
  assert sorted(saved) == sorted(w)
  for name, x in w.items():
    np.testing.assert_array_equal(saved[name], x, err_msg=name)
  model2, params2 = hf.load_clip(str(tmp_path / "b"))
  assert model2.config == model.config
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  with pytest.raises(ValueError, match="not empty"):
    hf.save_clip(model.config, params, str(tmp_path / "b"))


def test_load_clip_errors_name_the_tensors(tmp_path):
  w = random_clip()
  del w["vision_model.encoder.layers.1.mlp.fc2.bias"]
  w["text_projection.weight"] = w["text_projection.weight"][:, :20]
  w["vision_model.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as e:
    hf.load_clip(write_clip(str(tmp_path / "bad"), w))
  msg = str(e.value)
  assert "vision_model.encoder.layers.1.mlp.fc2.bias missing" in msg
  assert "text_projection.weight has shape (16, 20); expected (16, 24)" in msg
  assert "vision_model.extra.weight" in msg
  config = dict(vision_config=dict(VISION, hidden_act="relu"), text_config=TEXT)
  with pytest.raises(ValueError, match="hidden_act='relu'"):
    hf.config_from_hf(config)
