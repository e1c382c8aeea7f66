"""Hugging Face import/export vs an independent numpy forward of the HF Llama/Qwen models."""

import dataclasses
import functools
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as stn

from vlbpe_jax.lm import hf
from vlbpe_jax.lm import model as lm_model

LLAMA31 = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
               rope_theta=500_000.0, vocab_size=50, tie_word_embeddings=False,
               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=256))
QWEN2 = dict(model_type="qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-6,
             rope_theta=10_000.0, vocab_size=50, tie_word_embeddings=True)
QWEN3 = dict(QWEN2, model_type="qwen3", head_dim=16, num_key_value_heads=2)


def write_hf(path, config, seed=0, shards=2):
  """A random model in HF layout (names and [out, in] shapes of transformers' checkpoints)."""
  rng = np.random.default_rng(seed)
  d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  n, nkv = config["num_attention_heads"], config["num_key_value_heads"]
  k = config.get("head_dim", d // n)
  w = {"model.embed_tokens.weight": rng.normal(0, 1, (v, d)),
       "model.norm.weight": rng.normal(1, 0.1, (d,))}
  if not config["tie_word_embeddings"]:
    w["lm_head.weight"] = rng.normal(0, 0.2, (v, d))
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    w[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.2, (n * k, d))
    w[p + "self_attn.k_proj.weight"] = rng.normal(0, 0.2, (nkv * k, d))
    w[p + "self_attn.v_proj.weight"] = rng.normal(0, 0.2, (nkv * k, d))
    w[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.2, (d, n * k))
    if config["model_type"] == "qwen2":
      for name, rows in (("q", n * k), ("k", nkv * k), ("v", nkv * k)):
        w[p + f"self_attn.{name}_proj.bias"] = rng.normal(0, 0.2, (rows,))
    if config["model_type"] == "qwen3":
      w[p + "self_attn.q_norm.weight"] = rng.normal(1, 0.1, (k,))
      w[p + "self_attn.k_norm.weight"] = rng.normal(1, 0.1, (k,))
    w[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.2, (f, d))
    w[p + "mlp.up_proj.weight"] = rng.normal(0, 0.2, (f, d))
    w[p + "mlp.down_proj.weight"] = rng.normal(0, 0.2, (d, f))
    w[p + "input_layernorm.weight"] = rng.normal(1, 0.1, (d,))
    w[p + "post_attention_layernorm.weight"] = rng.normal(1, 0.1, (d,))
  w = {name: x.astype(np.float32) for name, x in w.items()}
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(config, fh)
  names = sorted(w)
  weight_map = {}
  for j in range(shards):
    fname = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
    part = {name: w[name] for name in names[j::shards]}
    stn.save_file(part, os.path.join(path, fname), {"format": "pt"})
    weight_map.update({name: fname for name in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
    json.dump({"metadata": {}, "weight_map": weight_map}, fh)
  return w


def reference_logits(w, config, ids):
  """Transformers' LlamaForCausalLM / Qwen2 / Qwen3 forward, written out in numpy (float64)."""
  w = {name: x.astype(np.float64) for name, x in w.items()}
  d, n = config["hidden_size"], config["num_attention_heads"]
  nkv, k = config["num_key_value_heads"], config.get("head_dim", d // n)
  eps, t = config["rms_norm_eps"], len(ids)

  def rms(x, g):
    return g * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))

  inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, k, 2) / k)
  rs = config.get("rope_scaling")
  if rs:  # transformers' _compute_llama3_parameters
    old, lo, hi, factor = (rs["original_max_position_embeddings"], rs["low_freq_factor"],
                           rs["high_freq_factor"], rs["factor"])
    new = []
    for f in inv_freq:
      wavelen = 2 * math.pi / f
      if wavelen < old / hi:
        new.append(f)
      elif wavelen > old / lo:
        new.append(f / factor)
      else:
        smooth = (old / wavelen - lo) / (hi - lo)
        new.append((1 - smooth) * f / factor + smooth * f)
    inv_freq = np.array(new)
  freqs = np.arange(t)[:, None] * inv_freq[None]
  emb = np.concatenate([freqs, freqs], axis=-1)
  cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]  # [T, 1, K]

  def rotate_half(x):
    return np.concatenate([-x[..., k // 2:], x[..., :k // 2]], axis=-1)

  x = w["model.embed_tokens.weight"][ids]
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = rms(x, w[p + "input_layernorm.weight"])
    proj = {}
    for name, heads in (("q", n), ("k", nkv), ("v", nkv)):
      y = h @ w[p + f"self_attn.{name}_proj.weight"].T
      y = y + w.get(p + f"self_attn.{name}_proj.bias", 0.0)
      y = y.reshape(t, heads, k)
      if p + f"self_attn.{name}_norm.weight" in w:
        y = rms(y, w[p + f"self_attn.{name}_norm.weight"])
      proj[name] = y
    q = proj["q"] * cos + rotate_half(proj["q"]) * sin
    kk = proj["k"] * cos + rotate_half(proj["k"]) * sin
    kk, vv = np.repeat(kk, n // nkv, axis=1), np.repeat(proj["v"], n // nkv, axis=1)
    s = np.einsum("tnk,snk->nts", q, kk) / math.sqrt(k)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("nts,snk->tnk", a, vv).reshape(t, n * k)
    x = x + o @ w[p + "self_attn.o_proj.weight"].T
    h = rms(x, w[p + "post_attention_layernorm.weight"])
    g = h @ w[p + "mlp.gate_proj.weight"].T
    x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ \
        w[p + "mlp.down_proj.weight"].T
  x = rms(x, w["model.norm.weight"])
  head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
  return x @ head.T


@functools.cache
def forward(model):
  return jax.jit(lambda p, ids: model.apply({"params": p}, ids))


IDS = np.array([3, 17, 42, 8, 0, 49, 25, 11, 30, 2, 7, 19])


@pytest.mark.parametrize("config", [LLAMA31, QWEN2, QWEN3], ids=["llama3.1", "qwen2", "qwen3"])
def test_load_matches_numpy_reference(tmp_path, config):
  w = write_hf(tmp_path / "hf", config)
  model, params = hf.load_llama(str(tmp_path / "hf"), dtype=jnp.float32)
  got = forward(model)(params, jnp.asarray(IDS[None]))[0]
  np.testing.assert_allclose(got, reference_logits(w, config, IDS), atol=2e-4, rtol=2e-4)


def test_rope_scaling_is_exercised():
  cfg = hf.config_from_hf(LLAMA31)
  k = cfg.head_dim
  plain = 1.0 / LLAMA31["rope_theta"] ** (np.arange(0, k, 2) / k)
  ratio = plain / lm_model.layers.rope_inv_freq(k, cfg.rope_theta, cfg.rope_scaling)
  assert np.isclose(ratio[0], 1) and np.isclose(ratio[-1], 8)
  assert ((ratio > 1.01) & (ratio < 7.99)).any()  # the interpolated band


def test_save_load_round_trip_with_extended_vocab_and_scan(tmp_path):
  write_hf(tmp_path / "hf", LLAMA31)
  model, params = hf.load_llama(str(tmp_path / "hf"), scan_layers=True)
  assert params["layers"]["attn"]["q"].shape == (2, 32, 4, 8)
  ext = hf.extend_vocab(params, 10, jax.random.key(0))
  np.testing.assert_array_equal(ext["text_embed"], params["text_embed"])
  np.testing.assert_array_equal(ext["text_head"], params["text_head"])
  assert ext["visual_embed"].shape == (10, 32) and ext["visual_head"].shape == (10, 32)
  ext2 = hf.extend_vocab(ext, 3, jax.random.key(1))
  np.testing.assert_array_equal(ext2["visual_embed"][:10], ext["visual_embed"])
  cfg = dataclasses.replace(model.config, num_special=2, num_vq=5, num_bpe=3)
  hf.save_llama(cfg, ext, str(tmp_path / "out"), max_shard_bytes=20_000)
  files = os.listdir(tmp_path / "out")
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  model2, params2 = hf.load_llama(str(tmp_path / "out"))
  assert model2.config == dataclasses.replace(cfg, scan_layers=False)
  jax.tree.map(np.testing.assert_array_equal, params2, lm_model.unstack_layers(ext, 2))
  ids = jnp.asarray([[3, 55, 12, 60, 59]])
  np.testing.assert_allclose(forward(model2)(params2, ids),
                             forward(lm_model.LM(cfg))(ext, ids), atol=1e-5)
  with open(tmp_path / "out" / "config.json") as fh:
    saved = json.load(fh)
  assert saved["vocab_size"] == 60 and saved["rope_scaling"]["rope_type"] == "llama3"
  saved_w = {}
  for f in files:
    if f.endswith(".safetensors"):
      saved_w.update(stn.load_file(str(tmp_path / "out" / f)))
  assert saved_w["model.layers.1.self_attn.o_proj.weight"].shape == (32, 32)
  assert saved_w["model.embed_tokens.weight"].shape == (60, 32)


def test_new_text_rows_are_exported_at_their_ids(tmp_path):
  """`new_text_embed` / `new_text_head` (e.g. the trained `<img>` `</img>` rows) replace the
  text rows at `new_text_ids` in the HF tables; loading restores them and the ids."""
  write_hf(tmp_path / "hf", LLAMA31)
  model, params = hf.load_llama(str(tmp_path / "hf"))
  ext = hf.extend_vocab(params, 10, jax.random.key(0), n_new_text=2)
  assert ext["new_text_embed"].shape == (2, 32) and ext["new_text_head"].shape == (2, 32)
  cfg = dataclasses.replace(model.config, num_special=2, num_vq=5, num_bpe=3,
                            new_text_ids=(7, 11))
  hf.save_llama(cfg, ext, str(tmp_path / "out"))
  saved = stn.load_file(str(tmp_path / "out" / "model.safetensors"))
  for hf_name, name in (("model.embed_tokens.weight", "embed"), ("lm_head.weight", "head")):
    np.testing.assert_array_equal(saved[hf_name][[7, 11]], ext[f"new_text_{name}"])
    np.testing.assert_array_equal(saved[hf_name][[3, 12]], np.asarray(ext[f"text_{name}"])[[3, 12]])
  model2, params2 = hf.load_llama(str(tmp_path / "out"))
  assert model2.config == cfg
  for name in ("new_text_embed", "new_text_head", "visual_embed", "layers_1"):
    jax.tree.map(np.testing.assert_array_equal, params2[name], ext[name])
  ids = jnp.asarray([[3, 7, 55, 11, 12]])
  np.testing.assert_allclose(forward(model2)(params2, ids),
                             forward(lm_model.LM(cfg))(ext, ids), atol=1e-5)


def test_bad_checkpoints_raise(tmp_path):
  with pytest.raises(ValueError, match="model_type"):
    hf.config_from_hf(dict(LLAMA31, model_type="gpt2"))
  with pytest.raises(ValueError, match="rope_scaling"):
    hf.config_from_hf(dict(LLAMA31, rope_scaling=dict(type="yarn", factor=2.0)))
  w = write_hf(tmp_path / "hf", QWEN2, shards=1)
  del w["model.layers.1.mlp.up_proj.weight"]
  stn.save_file(w, str(tmp_path / "hf" / "model-00001-of-00001.safetensors"))
  with pytest.raises(ValueError, match="mlp.up_proj.weight missing"):
    hf.load_llama(str(tmp_path / "hf"))


def _tiny_model(tmp_path, seed=0):
  write_hf(tmp_path / f"hf{seed}", QWEN2, seed=seed)
  return hf.load_llama(str(tmp_path / f"hf{seed}"))


def test_save_replaces_an_earlier_sharded_checkpoint_whole(tmp_path):
  model, old = _tiny_model(tmp_path, seed=0)
  _, new = _tiny_model(tmp_path, seed=1)
  out = str(tmp_path / "out")
  hf.save_llama(model.config, old, out, max_shard_bytes=20_000)
  assert "model.safetensors.index.json" in os.listdir(out)
  with pytest.raises(ValueError, match=r"out_dir=.*out.*not empty.*overwrite=True"):
    hf.save_llama(model.config, new, out)
  jax.tree.map(np.testing.assert_array_equal, hf.load_llama(out)[1], old)  # untouched
  hf.save_llama(model.config, new, out, overwrite=True)  # one shard now
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  jax.tree.map(np.testing.assert_array_equal, hf.load_llama(out)[1], new)
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left
  with pytest.raises(ValueError, match="not a directory"):
    hf.save_llama(model.config, new, str(tmp_path / "out" / "config.json"), overwrite=True)


def test_save_failure_leaves_the_old_checkpoint(tmp_path, monkeypatch):
  model, old = _tiny_model(tmp_path)
  out = str(tmp_path / "out")
  hf.save_llama(model.config, old, out)

  def crash(*args, **kwargs):
    raise OSError("disk full")

  with monkeypatch.context() as m:
    m.setattr(hf.stn, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
      hf.save_llama(model.config, old, out, overwrite=True)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  rename = os.rename

  def swap_fails(src, dst):
    if ".tmp-" in os.fspath(src):
      raise OSError("rename failed")
    rename(src, dst)

  with monkeypatch.context() as m:
    m.setattr(hf.os, "rename", swap_fails)
    with pytest.raises(OSError, match="rename failed"):
      hf.save_llama(model.config, old, out, overwrite=True)
  jax.tree.map(np.testing.assert_array_equal, hf.load_llama(out)[1], old)
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_saved_files_get_the_umask(tmp_path):
  model, params = _tiny_model(tmp_path)
  old = os.umask(0o022)
  try:
    hf.save_llama(model.config, params, str(tmp_path / "out"), max_shard_bytes=20_000)
  finally:
    os.umask(old)
  modes = {f: os.stat(tmp_path / "out" / f).st_mode & 0o777
           for f in os.listdir(tmp_path / "out")}
  assert len(modes) > 3 and set(modes.values()) == {0o644}, modes
  assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755


def _rewrite(path, w):
  """Replaces the checkpoint's tensors by `w` (one shard, no index)."""
  for f in os.listdir(path):
    if f.startswith("model"):
      os.remove(os.path.join(path, f))
  stn.save_file(w, os.path.join(path, "model.safetensors"))


def test_wrong_shapes_are_listed_before_building_params(tmp_path):
  w = write_hf(tmp_path / "hf", QWEN2)
  w["model.norm.weight"] = np.ones(31, np.float32)
  w["model.layers.0.mlp.up_proj.weight"] = w["model.layers.0.mlp.up_proj.weight"].T.copy()
  w["model.layers.1.self_attn.k_proj.bias"] = np.ones(9, np.float32)
  w["model.layers.2.mlp.up_proj.weight"] = np.ones((48, 32), np.float32)
  del w["model.layers.1.mlp.down_proj.weight"]
  _rewrite(tmp_path / "hf", w)
  with pytest.raises(ValueError) as e:
    hf.load_llama(str(tmp_path / "hf"))
  msg = str(e.value)
  assert "config.json" in msg and str(tmp_path / "hf") in msg
  assert "model.norm.weight has shape (31,); expected (32,)" in msg
  assert "model.layers.0.mlp.up_proj.weight has shape (32, 48); expected (48, 32)" in msg
  assert "model.layers.1.self_attn.k_proj.bias has shape (9,); expected (8,)" in msg
  assert "model.layers.1.mlp.down_proj.weight missing" in msg
  assert "unexpected tensors ['model.layers.2.mlp.up_proj.weight']" in msg


@pytest.mark.parametrize("edit, match", [
    (lambda c: {k: v for k, v in c.items() if k not in ("hidden_size", "intermediate_size")},
     r"config.json: required keys \['hidden_size', 'intermediate_size'\] missing"),
    (lambda c: dict(c, num_hidden_layers="2"), r"config.json: num_hidden_layers='2'"),
    (lambda c: dict(c, rope_scaling=dict(rope_type="llama3", factor=8.0)),
     r"config.json: rope_scaling.*missing.*low_freq_factor"),
    (lambda c: dict(c, vlbpe_vocab=dict(text_vocab=40, num_special=2, num_vq=5, num_bpe=1)),
     r"config.json: vlbpe_vocab .* sums to 48; expected vocab_size=50"),
    (lambda c: [c], r"config.json: expected a JSON object"),
])
def test_bad_config_json_names_the_file(tmp_path, edit, match):
  write_hf(tmp_path / "hf", LLAMA31)
  with open(tmp_path / "hf" / "config.json", "w") as fh:
    json.dump(edit(LLAMA31), fh)
  with pytest.raises(ValueError, match=match) as e:
    hf.load_llama(str(tmp_path / "hf"))
  assert str(tmp_path / "hf" / "config.json") in str(e.value)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json",
                                  "model-00002-of-00002.safetensors"])
def test_truncated_files_name_the_file(tmp_path, name):
  write_hf(tmp_path / "hf", QWEN2)
  path = tmp_path / "hf" / name
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  with pytest.raises(ValueError, match=re.escape(str(path))):
    hf.load_llama(str(tmp_path / "hf"))
