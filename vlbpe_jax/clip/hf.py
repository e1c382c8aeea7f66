"""Hugging Face `CLIPModel` checkpoints (OpenAI-CLIP layout) <-> CLIP params (numpy, no torch).

  model, params = load_clip("/ckpt/clip-vit-base-patch16")  # config.json + *.safetensors
  save_clip(model.config, params, "/out/clip")              # same layout, loadable by HF

Keys: `vision_model.embeddings.{patch_embedding.weight, class_embedding,
position_embedding.weight}`, `vision_model.pre_layrnorm` (sic), `{vision,text}_model.encoder.
layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}`,
`vision_model.post_layernorm`, `visual_projection.weight`, `text_model.embeddings.{token,
position}_embedding.weight`, `text_model.final_layer_norm`, `text_projection.weight`,
`logit_scale`. HF stores `[out, in]` matrices and `[D, 3, P, P]` convolutions; we store
`[in, ...out]` (see lm/hf.py) and `[P, P, 3, D]`. `*.position_ids` buffers of old checkpoints
are ignored. Missing config.json fields take transformers' CLIP defaults (ViT-B/32 sizes).

Pixel normalisation: image_mean/std come from preprocessor_config.json when present, else
OpenAI's; the model still takes images in [-1, 1] (model.py). Text pooling: HF/OpenAI pool at
`argmax(ids)` (the EOT, id 49407, is the largest) or at the first `eos_token_id`; we pool at the
last non-pad token with pad id 0. Both agree on OpenAI-tokenised ids (padded with 0); ids from
HF's CLIPTokenizer are padded with the EOT and must be re-padded with 0 after the first EOT.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy as stn

from vlbpe_jax import fileio
from vlbpe_jax.clip import model as clip_model
from vlbpe_jax.clip.hf_config import config_from_hf, config_to_hf
from vlbpe_jax.lm import hf as lm_hf

# lm/hf.py's safetensors reader, shape check and atomic folder, and its [out, in] conversions.
_Tensors = lm_hf._Tensors  # pylint: disable=protected-access
_check_tensors = lm_hf._check_tensors  # pylint: disable=protected-access
_fresh_folder = lm_hf._fresh_folder  # pylint: disable=protected-access

# (our path under blocks_{i}, HF name under encoder.layers.{i}, kind)
_BLOCK_KEYS = tuple(
    [(("attn", n), f"self_attn.{n}_proj.weight", "in_heads") for n in "qkv"] +
    [(("attn", f"{n}_bias"), f"self_attn.{n}_proj.bias", "bias") for n in "qkv"] +
    [(("attn", "o"), "self_attn.out_proj.weight", "heads_out"),
     (("attn", "o_bias"), "self_attn.out_proj.bias", "vector")] +
    [((ln, p), f"layer_norm{ln[-1]}.{hf_p}", "vector")
     for ln in ("ln_1", "ln_2") for p, hf_p in (("scale", "weight"), ("bias", "bias"))] +
    [(("mlp", fc, "kernel"), f"mlp.{fc}.weight", "matrix") for fc in ("fc1", "fc2")] +
    [(("mlp", fc, "bias"), f"mlp.{fc}.bias", "vector") for fc in ("fc1", "fc2")])



def _norm_keys(ours, hf):
  return [((ours, "scale"), f"{hf}.weight", "vector"), ((ours, "bias"), f"{hf}.bias", "vector")]


def key_table(cfg):
  """[(HF name, our param path, kind)] of every tensor of a CLIPModel of `cfg`."""
  if cfg.conv_stem:
    raise ValueError(f"conv_stem={cfg.conv_stem}: HF CLIPModel has no convolutional stem; "
                     "expected conv_stem=() (one patch_size conv) to load or save this layout")
  v, t = "vision_model.", "text_model."
  table = [
      (v + "embeddings.patch_embedding.weight", ("visual", "patch_embed", "kernel"), "conv"),
      (v + "embeddings.class_embedding", ("visual", "class_embedding"), "vector"),
      (v + "embeddings.position_embedding.weight", ("visual", "position_embedding"), "vector"),
      ("visual_projection.weight", ("visual", "proj"), "matrix"),
      (t + "embeddings.token_embedding.weight", ("text", "token_embedding"), "vector"),
      (t + "embeddings.position_embedding.weight", ("text", "position_embedding"), "vector"),
      ("text_projection.weight", ("text", "proj"), "matrix"),
      ("logit_scale", ("logit_scale",), "vector")]
  for tower, ours, hf in (("visual", "ln_pre", "pre_layrnorm"), ("visual", "ln_post",
                                                                 "post_layernorm"),
                          ("text", "ln_final", "final_layer_norm")):
    prefix = v if tower == "visual" else t
    table += [(prefix + name, (tower,) + path, k) for path, name, k in _norm_keys(ours, hf)]
  for tower, prefix, depth in (("visual", v, cfg.depth), ("text", t, cfg.text_depth)):
    for i in range(depth):
      table += [(f"{prefix}encoder.layers.{i}.{name}",
                 (tower, "transformer", f"blocks_{i}") + path, kind)
                for path, name, kind in _BLOCK_KEYS]
  return table


def _hf_shape(shape, kind):
  if kind == "conv":  # [P, P, 3, D] -> [D, 3, P, P]
    return (shape[3], shape[2], shape[0], shape[1])
  return lm_hf._hf_shape(shape, kind)  # pylint: disable=protected-access


def _to_ours(w, kind, shape):
  if kind == "conv":
    return w.transpose(2, 3, 1, 0)
  return lm_hf._to_ours(w, kind, shape)  # pylint: disable=protected-access


def _to_hf(x, kind):
  if kind == "conv":
    return x.transpose(3, 2, 0, 1)
  return lm_hf._to_hf(x, kind)  # pylint: disable=protected-access


def _pixel_norm(hf_dir):
  """(image_mean, image_std) from preprocessor_config.json, else OpenAI's."""
  path = os.path.join(hf_dir, "preprocessor_config.json")
  if not os.path.exists(path):
    return clip_model.OPENAI_MEAN, clip_model.OPENAI_STD
  pre = fileio.read_json(path, what="Hugging Face preprocessor config")
  out = []
  for name in ("image_mean", "image_std"):
    value = pre.get(name) if isinstance(pre, dict) else None
    if (not isinstance(value, list) or len(value) != 3 or
        not all(isinstance(x, (int, float)) and x > (0 if name == "image_std" else -1)
                for x in value)):
      raise ValueError(f"{path}: {name}={value!r}; expected a list of 3 numbers")
    out.append(tuple(float(x) for x in value))
  return tuple(out)


def param_shapes(model):
  """Our param tree of `model` (CLIP) as shapes, without allocating."""
  c = model.config
  images = jnp.zeros((1, c.image_size, c.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images, jnp.ones((1, 1), jnp.int32))
  return jax.tree.map(lambda x: x.shape, nn.unbox(shapes["params"]))


def load_clip(hf_dir, dtype=jnp.float32, compute_dtype=None, **overrides):
  """Returns `(CLIP, params)`; params (unboxed) in `dtype`, compute in `compute_dtype or dtype`.

  `overrides` set CLIPConfig fields. Every tensor's shape is checked against config.json before
  any is read; missing, extra or misshapen tensors raise one ValueError listing them by name.
  """
  config_path = os.path.join(hf_dir, "config.json")
  hf = fileio.read_json(config_path, what="Hugging Face config")
  mean, std = _pixel_norm(hf_dir)
  dtype = jnp.dtype(dtype)
  cfg = config_from_hf(hf, source=config_path, **{
      "image_mean": mean, "image_std": std, "param_dtype": dtype.name,
      "dtype": jnp.dtype(compute_dtype or dtype).name, **overrides})
  model = clip_model.CLIP(cfg)
  shapes = param_shapes(model)
  table = key_table(cfg)
  t = _Tensors(hf_dir)
  for key in list(t):
    if key.endswith("embeddings.position_ids"):  # a buffer old checkpoints saved
      t.pop(key)
  expected = {name: (_hf_shape(_lookup(shapes, path), kind), True) for name, path, kind in table}
  _check_tensors(t, expected, f"hf_dir={hf_dir!r}: the safetensors do not match {config_path}")
  params = {}
  for name, path, kind in table:
    w = _to_ours(np.asarray(t.pop(name)), kind, _lookup(shapes, path))
    lm_hf._store(params, path, jnp.asarray(w, dtype))  # pylint: disable=protected-access
  return model, params


def save_clip(config, params, out_dir, dtype=None, *, overwrite=False):
  """Writes config.json, preprocessor_config.json and model.safetensors in HF CLIPModel layout.

  A non-empty `out_dir` raises unless `overwrite=True` (then replaced whole, atomically).
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"out_dir={out_dir!r} is not a directory; expected a checkpoint folder")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ValueError(f"out_dir={out_dir!r} is not empty; expected a new or empty folder, or "
                     "overwrite=True to replace the checkpoint there")
  params = nn.unbox(params)
  # .copy(order="C"), not np.ascontiguousarray, which turns the 0-d logit_scale into [1].
  np_ = lambda x: np.asarray(x if dtype is None else jnp.asarray(x, dtype)).copy(  # noqa: E731
      order="C")
  tensors = {name: np_(_to_hf(np.asarray(_lookup(params, path)), kind))
             for name, path, kind in key_table(config)}
  pre = {"image_mean": list(config.image_mean), "image_std": list(config.image_std),
         "size": {"shortest_edge": config.image_size},
         "crop_size": {"height": config.image_size, "width": config.image_size}}
  with _fresh_folder(out_dir) as tmp:
    fileio.write_json(os.path.join(tmp, "config.json"), config_to_hf(config), indent=2)
    fileio.write_json(os.path.join(tmp, "preprocessor_config.json"), pre, indent=2)
    mode = os.stat(tmp).st_mode & 0o666  # safetensors writes 0600; use the umask's mode
    stn.save_file(tensors, os.path.join(tmp, "model.safetensors"), {"format": "pt"})
    os.chmod(os.path.join(tmp, "model.safetensors"), mode)


def _lookup(tree, path):
  for k in path:
    tree = tree[k]
  return tree
