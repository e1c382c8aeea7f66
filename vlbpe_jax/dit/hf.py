"""Import a DiT checkpoint in the diffusers Lumina-Next layout used by BLIP3-o.

  model, params = load_nextdit("/path/to/dit")        # *.safetensors (+ config.json)
  v = model.apply({"params": params}, x, t, cond, cond_mask)

Tensor names are those of BLIP3-o's `LuminaNextDiT2DModel` (blip3o/model/lumina_nextdit2d.py:
diffusers' class with a caption projection and cross-attention over the projected states), with
any common prefix (e.g. `model.dit.model.` inside a whole BLIP3-o checkpoint) found from
`patch_embedder.proj.weight`. The sizes come from `config` or from config.json in either the
diffusers (`hidden_size`, `num_layers`, ...) or BLIP3-o's NextDiTCrossAttnConfig (`dim`,
`n_layers`, ...) spelling. Matrices are [out, in] there; q/k head dims and patch features are
permuted into our layouts (embed.py).
"""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlbpe_jax import fileio
from vlbpe_jax.dit import config as dit_config
from vlbpe_jax.dit import embed
from vlbpe_jax.dit import model as dit_model
from vlbpe_jax.lm.hf import _Tensors

_ANCHOR = "patch_embedder.proj.weight"
_TOP = (("patch_embedder.proj.weight", "patch_embed/kernel", "patch"),
        ("patch_embedder.proj.bias", "patch_embed/bias", "vec"),
        ("caption_projection.linear_1.weight", "cap_in/kernel", "linear"),
        ("caption_projection.linear_1.bias", "cap_in/bias", "vec"),
        ("caption_projection.linear_2.weight", "cap_out/kernel", "linear"),
        ("caption_projection.linear_2.bias", "cap_out/bias", "vec"),
        ("time_caption_embed.timestep_embedder.linear_1.weight", "t_in/kernel", "linear"),
        ("time_caption_embed.timestep_embedder.linear_1.bias", "t_in/bias", "vec"),
        ("time_caption_embed.timestep_embedder.linear_2.weight", "t_out/kernel", "linear"),
        ("time_caption_embed.timestep_embedder.linear_2.bias", "t_out/bias", "vec"),
        ("time_caption_embed.caption_embedder.0.weight", "cap_pool_norm/scale", "vec"),
        ("time_caption_embed.caption_embedder.0.bias", "cap_pool_norm/bias", "vec"),
        ("time_caption_embed.caption_embedder.1.weight", "cap_pool/kernel", "linear"),
        ("time_caption_embed.caption_embedder.1.bias", "cap_pool/bias", "vec"),
        ("norm_out.linear_1.weight", "final_scale/kernel", "linear"),
        ("norm_out.linear_1.bias", "final_scale/bias", "vec"),
        ("norm_out.linear_2.weight", "final_out/kernel", "linear"),
        ("norm_out.linear_2.bias", "final_out/bias", "vec"))
_LAYER = [("gate", "attn/cross_gate", "vec"),
          ("attn2.to_out.0.weight", "attn/out", "out"),
          ("feed_forward.linear_1.weight", "mlp/gate/kernel", "linear"),
          ("feed_forward.linear_3.weight", "mlp/up/kernel", "linear"),
          ("feed_forward.linear_2.weight", "mlp/down/kernel", "linear"),
          ("norm1.linear.weight", "adaln/kernel", "linear"),
          ("norm1.linear.bias", "adaln/bias", "vec"),
          ("norm1.norm.weight", "attn_norm1/scale", "vec"),
          ("norm2.weight", "attn_norm2/scale", "vec"),
          ("ffn_norm1.weight", "ffn_norm1/scale", "vec"),
          ("ffn_norm2.weight", "ffn_norm2/scale", "vec"),
          ("norm1_context.weight", "cond_norm/scale", "vec")]
for _hf, _ours in (("attn1", "self"), ("attn2", "cross")):
  _LAYER += [(f"{_hf}.to_q.weight", f"attn/{_ours}_q", "qk"),
             (f"{_hf}.to_k.weight", f"attn/{_ours}_k", "qk"),
             (f"{_hf}.to_v.weight", f"attn/{_ours}_v", "v")]
  _LAYER += [(f"{_hf}.norm_{n}.{w}", f"attn/{_ours}_{n}_norm/{p}", "qk_norm")
             for n in ("q", "k") for w, p in (("weight", "scale"), ("bias", "bias"))]

_SPELLINGS = {  # ours: (diffusers, BLIP3-o NextDiTCrossAttnConfig)
    "grid": ("sample_size", "input_size"), "patch_size": ("patch_size", "patch_size"),
    "in_channels": ("in_channels", "in_channels"), "dim": ("hidden_size", "dim"),
    "depth": ("num_layers", "n_layers"), "heads": ("num_attention_heads", "n_heads"),
    "cond_dim": ("cross_attention_dim", "latent_embedding_size"),
    "multiple_of": ("multiple_of", "multiple_of"),
    "ffn_dim_multiplier": ("ffn_dim_multiplier", "ffn_dim_multiplier"),
    "norm_eps": ("norm_eps", "norm_eps"), "qk_norm": ("qk_norm", "qk_norm")}


def config_from_hf(hf, source="config.json", **overrides):
  """DiTConfig from a diffusers or NextDiTCrossAttn config dict."""
  style = 0 if "hidden_size" in hf else 1
  defaults = dict(patch_size=(2, 1)[style], multiple_of=256, ffn_dim_multiplier=None,
                  norm_eps=1e-5, qk_norm=True)  # the two classes' defaults
  kw = {ours: hf[names[style]] for ours, names in _SPELLINGS.items() if names[style] in hf}
  missing = sorted(n[style] for o, n in _SPELLINGS.items() if o not in kw and o in (
      "grid", "in_channels", "dim", "depth", "heads", "cond_dim"))
  if missing:
    raise ValueError(f"{source}: keys {missing} missing")
  if hf.get("learn_sigma"):
    raise ValueError(f"{source}: learn_sigma=True is not supported (BLIP3-o: False)")
  kv = hf.get("num_kv_heads", hf.get("n_kv_heads"))
  if kv not in (None, kw["heads"]):
    raise ValueError(f"{source}: num_kv_heads={kv} != heads={kw['heads']} (GQA unsupported)")
  size = kw["grid"]
  kw["grid"] = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
  return dit_config.config_for("tiny", **{**defaults, **kw, **overrides})


def _to_ours(x, kind, shape, perm, p):
  """One tensor from the [out, in] diffusers layout to ours (`shape`)."""
  if kind == "linear":
    return x.T
  if kind == "patch":  # [D, (C, py, px)] -> [(py, px, C), D]
    d, c = x.shape[0], shape[0] // (p * p)
    return x.reshape(d, c, p, p).transpose(2, 3, 1, 0).reshape(shape)
  if kind in ("qk", "v"):  # [N*K, Din] -> [Din, N, K]
    y = x.reshape(shape[1], shape[2], shape[0])
    return (y[:, perm] if kind == "qk" else y).transpose(2, 0, 1)
  if kind == "qk_norm":  # [N*K] -> [N, K]
    return x.reshape(shape)[:, perm]
  if kind == "out":  # [D, N*K] -> [N, K, D]
    return x.T.reshape(shape)
  return x


def _hf_shape(kind, shape):
  if kind in ("linear", "patch"):
    return tuple(shape[::-1])
  if kind in ("qk", "v"):
    return (shape[1] * shape[2], shape[0])
  if kind == "qk_norm":
    return (shape[0] * shape[1],)
  if kind == "out":
    return (shape[2], shape[0] * shape[1])
  return tuple(shape)


def _find_prefix(t, hf_dir):
  hits = sorted(k[:-len(_ANCHOR)] for k in t if k.endswith(_ANCHOR))
  if len(hits) != 1:
    raise ValueError(f"hf_dir={hf_dir!r}: expected one tensor named '<prefix>{_ANCHOR}', found "
                     f"{len(hits)} {hits[:4]}; pass prefix=")
  return hits[0]


def load_nextdit(hf_dir, config=None, *, prefix=None, dtype=jnp.float32, **overrides):
  """Returns `(DiT, params)`, params (unboxed) in `dtype`.

  config: a DiTConfig, else read from hf_dir/config.json (`overrides` set other fields, e.g.
  `scan_layers=True`, `dtype="bfloat16"`). Every tensor under the prefix is checked before any
  is read: one ValueError lists the missing, misshapen and unexpected ones.
  """
  if config is None:
    path = os.path.join(hf_dir, "config.json")
    config = config_from_hf(fileio.read_json(path, what="DiT config"), source=path, **overrides)
  elif overrides:
    config = dataclasses.replace(config, **overrides)
  t = _Tensors(hf_dir)
  prefix = _find_prefix(t, hf_dir) if prefix is None else prefix
  c = config
  unrolled = dit_model.DiT(dataclasses.replace(c, scan_layers=False))
  x = jnp.zeros((1, c.grid[0], c.grid[1], c.in_channels))
  shapes = jax.eval_shape(unrolled.init, jax.random.key(0), x, jnp.zeros((1,)),
                          jnp.zeros((1, 1, c.cond_dim)), jnp.ones((1, 1), bool))
  shapes = nn.unbox(shapes["params"])
  table = list(_TOP) + [(f"layers.{i}.{h}", f"layers_{i}/{o}", k)
                        for i in range(c.depth) for h, o, k in _LAYER]
  if not c.qk_norm:
    table = [row for row in table if row[2] != "qk_norm"]
  expected = {prefix + h: (o, k, _get(shapes, o).shape) for h, o, k in table}
  problems = [f"tensor {k} missing" for k in expected if k not in t]
  problems += [f"tensor {k} has shape {t.shape(k)}; expected {_hf_shape(kd, s)}"
               for k, (_, kd, s) in expected.items() if k in t and t.shape(k) != _hf_shape(kd, s)]
  extra = sorted(k for k in t if k.startswith(prefix) and k not in expected)
  if extra:
    problems.append(f"unexpected tensors {extra[:8]}" +
                    (f" and {len(extra) - 8} more" if len(extra) > 8 else ""))
  if problems:
    raise ValueError(f"hf_dir={hf_dir!r} (prefix {prefix!r}) does not match the DiT config "
                     "(shapes in the diffusers layout, [out, in] matrices): " +
                     "; ".join(problems))
  perm = embed.lumina_head_perm(c.head_dim)
  params = {}
  for key, (ours, kind, shape) in expected.items():
    value = _to_ours(np.asarray(t.pop(key), np.float32), kind, shape, perm, c.patch_size)
    _set(params, ours, jnp.asarray(value, dtype))
  if c.scan_layers:
    layers = [params.pop(f"layers_{i}") for i in range(c.depth)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return dit_model.DiT(c), params


def _get(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _set(tree, path, value):
  *parents, leaf = path.split("/")
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[leaf] = value
