"""Hugging Face config.json <-> `LMConfig` (Llama-2/3/3.1, Qwen2, Qwen3).

An extended vocabulary is saved as one `vocab_size = text + visual` with the split recorded
under `"vlbpe_vocab"` (transformers keeps unknown keys as attributes and ignores them),
with `new_text_ids` (LMConfig) when there are any.
"""

from vlbpe_jax.lm import config as lm_config

_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_VOCAB_KEYS = ("text_vocab", "num_special", "num_vq", "num_bpe")
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "vocab_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")


def config_from_hf(hf, source="config.json", **overrides):
  """`LMConfig` from a parsed HF config.json dict; errors name `source` (the file)."""
  if not isinstance(hf, dict):
    raise ValueError(f"{source}: expected a JSON object, got a {type(hf).__name__}")
  kind = hf.get("model_type")
  if kind not in _ARCH:
    raise ValueError(f"{source}: model_type={kind!r}; expected one of {sorted(_ARCH)}")
  missing = [k for k in _REQUIRED if k not in hf]
  if missing:
    raise ValueError(f"{source}: required keys {missing} missing; a {kind} config.json needs "
                     f"all of {list(_REQUIRED)}")
  bad = {k: hf[k] for k in _REQUIRED + _OPTIONAL_SIZES
         if (k in _REQUIRED or hf.get(k) is not None) and not _positive_int(hf[k])}
  if bad:
    raise ValueError(f"{source}: {', '.join(f'{k}={v!r}' for k, v in bad.items())}; expected "
                     "positive integers")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; expected 'silu'")
  if hf.get("mlp_bias") or (kind == "llama" and hf.get("attention_bias")):
    raise ValueError(f"{source}: mlp_bias / Llama attention_bias (o_proj bias) unsupported")
  if hf.get("use_sliding_window"):
    raise ValueError(f"{source}: use_sliding_window=true: sliding-window attention unsupported")
  vocab = hf.get("vlbpe_vocab") or {"text_vocab": hf["vocab_size"]}
  if (not isinstance(vocab, dict) or not _positive_int(vocab.get("text_vocab"))
      or not all(_int_at_least(vocab.get(k, 0), 0) for k in _VOCAB_KEYS[1:])):
    raise ValueError(f"{source}: vlbpe_vocab={vocab!r}; expected {{text_vocab: int > 0, "
                     "num_special, num_vq, num_bpe: int >= 0}")
  new_ids = vocab.get("new_text_ids", [])
  if not isinstance(new_ids, list) or not all(_int_at_least(i, 0) for i in new_ids):
    raise ValueError(f"{source}: vlbpe_vocab new_text_ids={new_ids!r}; expected a list of "
                     "ints >= 0")
  total = sum(vocab.get(k, 0) for k in _VOCAB_KEYS)
  if total != hf["vocab_size"]:
    raise ValueError(f"{source}: vlbpe_vocab {vocab} sums to {total}; expected "
                     f"vocab_size={hf['vocab_size']}")
  fields = dict(
      width=hf["hidden_size"], depth=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
      mlp_dim=hf["intermediate_size"], norm_eps=_number(hf, "rms_norm_eps", 1e-6, source),
      rope_theta=_number(hf, "rope_theta", 10_000.0, source),
      rope_scaling=_rope_scaling(hf.get("rope_scaling"), source),
      qkv_bias=kind == "qwen2" or (kind == "qwen3" and bool(hf.get("attention_bias"))),
      qk_norm=kind == "qwen3", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      new_text_ids=tuple(new_ids), **{k: int(vocab.get(k, 0)) for k in _VOCAB_KEYS})
  try:
    return lm_config.LMConfig(**{**fields, **overrides})
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def _int_at_least(value, low):
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _positive_int(value):
  return _int_at_least(value, 1)


def _number(hf, key, default, source):
  value = hf.get(key, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{source}: {key}={value!r}; expected a number")
  return float(value)


def _rope_scaling(scaling, source):
  """`rope_scaling` dict -> LMConfig's (factor, low, high, original_max_position) or None."""
  if scaling is None:
    return None
  if not isinstance(scaling, dict):
    raise ValueError(f"{source}: rope_scaling={scaling!r}; expected an object or null")
  rope_type = scaling.get("rope_type", scaling.get("type"))
  if rope_type == "default":
    return None
  if rope_type != "llama3":
    raise ValueError(f"{source}: rope_scaling type {rope_type!r}; expected 'llama3'")
  missing = [k for k in _LLAMA3_KEYS if k not in scaling]
  if missing:
    raise ValueError(f"{source}: rope_scaling keys {missing} missing; llama3 scaling needs "
                     f"all of {list(_LLAMA3_KEYS)}")
  try:
    return (float(scaling["factor"]), float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{source}: rope_scaling={scaling!r}: expected numbers ({e})") from e


def config_to_hf(cfg):
  """HF config.json dict for an `LMConfig`."""
  kind = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
  out = dict(
      architectures=[_ARCH[kind]], model_type=kind, hidden_act="silu",
      hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
      vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
      torch_dtype="float32" if cfg.param_dtype == "float32" else cfg.param_dtype,
      attention_bias=bool(cfg.qkv_bias) if kind == "qwen3" else False)
  if cfg.rope_scaling is not None:
    f, lo, hi, old = cfg.rope_scaling
    out["rope_scaling"] = dict(rope_type="llama3", factor=f, low_freq_factor=lo,
                               high_freq_factor=hi, original_max_position_embeddings=old)
  if cfg.visual_vocab or cfg.new_text_ids:
    out["vlbpe_vocab"] = {k: getattr(cfg, k) for k in _VOCAB_KEYS}
    if cfg.new_text_ids:
      out["vlbpe_vocab"]["new_text_ids"] = list(cfg.new_text_ids)
  return out
