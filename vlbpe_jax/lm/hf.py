"""Hugging Face Llama-2/3/3.1, Qwen2 and Qwen3 checkpoints <-> LM params (numpy, no torch).

  model, params = load_llama("/ckpt/Llama-3.1-8B")         # config.json + *.safetensors
  params = extend_vocab(params, n_visual=16_388, key=key, n_new_text=2)  # + <img> </img>
  model = LM(dataclasses.replace(model.config, num_special=4, num_vq=8192, num_bpe=8192,
                                 new_text_ids=(tok.image_begin_id, tok.image_end_id)))
  save_llama(model.config, params, "/out/being-vl")        # shards + index, HF key names

HF stores `[out, in]` matrices; we store `[in, ...out]` kernels (`q: [D, N, K]`,
`o: [N, K, D]`). HF's q/k weights are already permuted for the rotate-half RoPE used here.
An extended vocabulary is saved as one `embed_tokens` / `lm_head` of `text + visual` rows, with
the split recorded under `"vlbpe_vocab"` in config.json so that loading restores both tables.
The rows of `new_text_embed` / `new_text_head` (`LMConfig.new_text_ids`, e.g. `<img>`) are
written into that table at their ids, in place of the unused text rows there, and the ids are
recorded, so HF sees the trained rows and loading restores the small tables from them.
"""

import contextlib
import dataclasses
import os
import secrets
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy as stn

from vlbpe_jax import fileio
from vlbpe_jax.lm import model as lm_model
from vlbpe_jax.lm.hf_config import config_from_hf, config_to_hf  # noqa: F401

# (our path under layers_i, HF name under model.layers.{i}, kind)
_LAYER_KEYS = (
    (("attn", "q"), "self_attn.q_proj.weight", "in_heads"),
    (("attn", "k"), "self_attn.k_proj.weight", "in_heads"),
    (("attn", "v"), "self_attn.v_proj.weight", "in_heads"),
    (("attn", "o"), "self_attn.o_proj.weight", "heads_out"),
    (("attn", "q_bias"), "self_attn.q_proj.bias", "bias"),
    (("attn", "k_bias"), "self_attn.k_proj.bias", "bias"),
    (("attn", "v_bias"), "self_attn.v_proj.bias", "bias"),
    (("attn", "q_norm", "scale"), "self_attn.q_norm.weight", "vector"),
    (("attn", "k_norm", "scale"), "self_attn.k_norm.weight", "vector"),
    (("mlp", "gate", "kernel"), "mlp.gate_proj.weight", "matrix"),
    (("mlp", "up", "kernel"), "mlp.up_proj.weight", "matrix"),
    (("mlp", "down", "kernel"), "mlp.down_proj.weight", "matrix"),
    (("attn_norm", "scale"), "input_layernorm.weight", "vector"),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", "vector"),
)


def _hf_shape(shape, kind):
  """Shape in the checkpoint (HF layout) of our tensor of `shape`."""
  if kind == "in_heads":  # [D, N, K] -> [N*K, D]
    return (int(np.prod(shape[1:])), shape[0])
  if kind == "heads_out":  # [N, K, D] -> [D, N*K]
    return (shape[-1], int(np.prod(shape[:-1])))
  if kind == "bias":  # [N, K] -> [N*K]
    return (int(np.prod(shape)),)
  return tuple(shape[::-1]) if kind == "matrix" else tuple(shape)  # [in, out] -> [out, in]


def _to_ours(w, kind, shape):
  """HF tensor (already checked to have `_hf_shape(shape, kind)`) -> our layout of `shape`."""
  if kind in ("in_heads", "heads_out", "matrix"):
    return w.T.reshape(shape)
  return w.reshape(shape)


def _to_hf(x, kind):
  if kind == "in_heads":
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_out":
    return x.reshape(-1, x.shape[-1]).T
  if kind == "bias":
    return x.reshape(-1)
  return x.T if kind == "matrix" else x


class _Tensors:
  """Lazy name -> numpy view of a checkpoint's shards: one tensor in memory at a time."""

  def __init__(self, hf_dir):
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
      data = fileio.read_json(index, what="safetensors index")
      weight_map = data.get("weight_map") if isinstance(data, dict) else None
      if not isinstance(weight_map, dict) or not all(
          isinstance(f, str) and f == os.path.basename(f) for f in weight_map.values()):
        raise ValueError(f"{index}: expected {{\"weight_map\": {{tensor: shard file name}}}}")
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
      raise ValueError(f"hf_dir={hf_dir!r}: no *.safetensors files")
    self._where = {}
    for name in files:
      path = os.path.join(hf_dir, name)
      try:
        handle = safetensors.safe_open(path, framework="np")
      except FileNotFoundError:
        raise ValueError(f"{path}: shard listed in {index} is missing") from None
      except Exception as e:  # SafetensorError (bad header, truncated data) or OSError.
        raise ValueError(f"{path}: not a readable safetensors file ({e}); the file is "
                         "truncated or corrupt: download or save it again") from e
      self._where.update({key: (handle, path) for key in handle.keys()})

  def __contains__(self, key):
    return key in self._where

  def __iter__(self):
    return iter(list(self._where))

  def shape(self, key):
    return tuple(self._where[key][0].get_slice(key).get_shape())

  def pop(self, key, *default):
    if key not in self._where:
      if default:
        return default[0]
      raise ValueError(f"checkpoint: tensor {key} missing")
    handle, path = self._where.pop(key)
    try:
      return handle.get_tensor(key)
    except Exception as e:  # SafetensorError: e.g. a dtype numpy cannot hold.
      raise ValueError(f"{path}: tensor {key} cannot be read ({e})") from e


def _check_tensors(t, expected, where):
  """Raises listing every missing, misshapen or unexpected tensor (shapes in HF layout)."""
  problems = []
  for key, (shape, required) in expected.items():
    if key not in t:
      if required:
        problems.append(f"tensor {key} missing")
    elif t.shape(key) != shape:
      problems.append(f"tensor {key} has shape {t.shape(key)}; expected {shape}")
  unused = sorted(k for k in t if k not in expected and "rotary_emb" not in k)
  if unused:
    problems.append(f"unexpected tensors {unused[:8]}" +
                    (f" and {len(unused) - 8} more" if len(unused) > 8 else ""))
  if problems:
    raise ValueError(f"{where} (shapes in the checkpoint's HF layout, [out, in] matrices): " +
                     "; ".join(problems))


def load_llama(hf_dir, dtype=jnp.float32, compute_dtype=None, **overrides):
  """Returns `(LM, params)`; params (unboxed) in `dtype`, compute in `compute_dtype or dtype`.

  `overrides` set other LMConfig fields (e.g. `scan_layers=True`, `attention_impl="cudnn"`).
  Every tensor's shape is checked against config.json before any is read; a mismatch raises
  a ValueError listing every bad key.
  """
  config_path = os.path.join(hf_dir, "config.json")
  hf = fileio.read_json(config_path, what="Hugging Face config")
  dtype = jnp.dtype(dtype)
  cfg = config_from_hf(hf, source=config_path, param_dtype=dtype.name,
                       dtype=jnp.dtype(compute_dtype or dtype).name, **overrides)
  unrolled = lm_model.LM(dataclasses.replace(cfg, scan_layers=False))
  shapes = jax.eval_shape(unrolled.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(shapes["params"]))
  table = (cfg.vocab_size, cfg.width)
  expected = {"model.embed_tokens.weight": (table, True), "model.norm.weight": ((cfg.width,), True),
              "lm_head.weight": (table, not cfg.tie_embeddings)}  # tied: may still be stored
  layer_keys = {}
  for i in range(cfg.depth):
    for path, hf_name, kind in _LAYER_KEYS:
      want = _lookup(shapes[f"layers_{i}"], path)
      if want is not None:
        layer_keys[f"model.layers.{i}.{hf_name}"] = (i, path, kind, want)
        expected[f"model.layers.{i}.{hf_name}"] = (_hf_shape(want, kind), True)
  t = _Tensors(hf_dir)
  _check_tensors(t, expected, f"hf_dir={hf_dir!r}: the safetensors do not match {config_path}")
  cast = lambda x: jnp.asarray(np.asarray(x), dtype)
  params = {"final_norm": {"scale": cast(t.pop("model.norm.weight"))}}
  embed = t.pop("model.embed_tokens.weight")
  head = None if cfg.tie_embeddings else t.pop("lm_head.weight")  # tied: a stored copy unread
  for name, table in (("embed", embed), ("head", head)):
    if table is None:
      continue
    params[f"text_{name}"] = cast(table[:cfg.text_vocab])
    if cfg.new_text_ids:
      params[f"new_text_{name}"] = cast(table[np.asarray(cfg.new_text_ids)])
    if cfg.visual_vocab:
      params[f"visual_{name}"] = cast(table[cfg.text_vocab:])
  for key, (i, path, kind, want) in layer_keys.items():
    _store(params.setdefault(f"layers_{i}", {}), path, cast(_to_ours(t.pop(key), kind, want)))
  if cfg.scan_layers:
    params = lm_model.stack_layers(params, cfg.depth)
  return lm_model.LM(cfg), params


def save_llama(model_config, params, out_dir, max_shard_bytes=5 * 2**30, dtype=None, *,
               overwrite=False):
  """Writes config.json and safetensors shards (+ index when more than one) in HF layout.

  `out_dir` ends up holding exactly this checkpoint: a non-empty `out_dir` raises unless
  `overwrite=True`, which replaces it whole. Files are written into a temporary sibling folder
  that is then renamed onto `out_dir`, so a crash leaves the old checkpoint or the new one
  (or, between the two renames, both as hidden siblings), never a mix of their shards.
  """
  cfg = model_config
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"out_dir={out_dir!r} is not a directory; expected a checkpoint folder")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ValueError(f"out_dir={out_dir!r} is not empty; expected a new or empty folder, or "
                     "overwrite=True to replace the checkpoint there")
  if "layers" in params:
    params = lm_model.unstack_layers(params, cfg.depth)
  np_ = lambda x: np.asarray(x if dtype is None else jnp.asarray(x, dtype))
  tensors = {"model.embed_tokens.weight": np_(_full_table(params, "embed", cfg))}
  for i in range(cfg.depth):
    for path, hf_name, kind in _LAYER_KEYS:
      x = _lookup(params[f"layers_{i}"], path)
      if x is not None:
        tensors[f"model.layers.{i}.{hf_name}"] = np_(_to_hf(x, kind))
  tensors["model.norm.weight"] = np_(params["final_norm"]["scale"])
  if not cfg.tie_embeddings:
    tensors["lm_head.weight"] = np_(_full_table(params, "head", cfg))
  shards, size = [{}], 0
  for name, x in tensors.items():
    if shards[-1] and size + x.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = np.ascontiguousarray(x)
    size += x.nbytes
  with _fresh_folder(out_dir) as tmp:
    fileio.write_json(os.path.join(tmp, "config.json"), config_to_hf(cfg), indent=2)
    # safetensors creates files 0600: give them the umask's mode, read off the new folder.
    mode = os.stat(tmp).st_mode & 0o666
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))])
    for fname, shard in zip(names, shards):
      stn.save_file(shard, os.path.join(tmp, fname), {"format": "pt"})
      os.chmod(os.path.join(tmp, fname), mode)
    if len(shards) > 1:
      index = {"metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))},
               "weight_map": {name: f for f, shard in zip(names, shards) for name in shard}}
      fileio.write_json(os.path.join(tmp, "model.safetensors.index.json"), index, indent=2)


@contextlib.contextmanager
def _fresh_folder(out_dir):
  """Yields an empty sibling folder of `out_dir` (umask mode); swaps it in if the block ends."""
  parent, base = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  tag = f"{os.getpid()}-{secrets.token_hex(4)}"
  tmp, old = (os.path.join(parent, f".{base}.{kind}-{tag}") for kind in ("tmp", "old"))
  os.mkdir(tmp)
  try:
    yield tmp
    if os.path.isdir(out_dir):
      os.rename(out_dir, old)
    try:
      os.rename(tmp, out_dir)
    except OSError:
      if os.path.isdir(old):
        os.rename(old, out_dir)
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def extend_vocab(params, n_visual, key, *, n_new_text=0):
  """Appends `n_visual` rows to `visual_embed` (and `visual_head` when untied).

  Text rows are untouched. New rows are drawn from a diagonal Gaussian fitted to the existing
  text rows (mean + std * N(0, 1)), so they start at the scale of the pretrained embeddings.
  Update the config to match (`num_special + num_vq + num_bpe` grows by `n_visual`).
  `n_new_text`: also draw (replace) `new_text_embed` / `new_text_head` with that many rows, for
  `LMConfig.new_text_ids` (e.g. `<img>` `</img>`) of as many ids.
  """
  if n_visual < 1:
    raise ValueError(f"n_visual={n_visual}: expected >= 1")
  out = dict(params)
  for name, k in (("embed", key), ("head", jax.random.fold_in(key, 1))):
    text = params.get(f"text_{name}")
    if text is None:
      continue
    mean, std = text.mean(axis=0), text.std(axis=0)
    rows = (mean + std * jax.random.normal(k, (n_visual + n_new_text, text.shape[1]))
            ).astype(text.dtype)
    rows, new_rows = rows[:n_visual], rows[n_visual:]
    if n_new_text:
      out[f"new_text_{name}"] = new_rows
    old = params.get(f"visual_{name}")
    out[f"visual_{name}"] = rows if old is None else jnp.concatenate([old, rows])
  return out


def _full_table(params, name, cfg):
  """The `[V, D]` table HF reads: text rows (new-text rows at their ids), then visual rows."""
  text = params[f"text_{name}"]
  if cfg.new_text_ids:
    text = jnp.asarray(text).at[np.asarray(cfg.new_text_ids)].set(params[f"new_text_{name}"])
  parts = [text] + ([params[f"visual_{name}"]] if cfg.visual_vocab else [])
  return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def _lookup(tree, path):
  for k in path:
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _store(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value
