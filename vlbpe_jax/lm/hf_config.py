"""Hugging Face config.json <-> `LMConfig` (Llama-2/3/3.1, Qwen2, Qwen3).

An extended vocabulary is saved as one `vocab_size = text + visual` with the split recorded
under `"vlbpe_vocab"` (transformers keeps unknown keys as attributes and ignores them).
"""

from vlbpe_jax.lm import config as lm_config

_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_VOCAB_KEYS = ("text_vocab", "num_special", "num_vq", "num_bpe")


def config_from_hf(hf, **overrides):
  """`LMConfig` from a parsed HF config.json dict."""
  kind = hf.get("model_type")
  if kind not in _ARCH:
    raise ValueError(f"config.json model_type={kind!r}; expected one of {sorted(_ARCH)}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}; expected 'silu'")
  if hf.get("mlp_bias") or (kind == "llama" and hf.get("attention_bias")):
    raise ValueError("config.json: mlp_bias / Llama attention_bias (o_proj bias) unsupported")
  if hf.get("use_sliding_window"):
    raise ValueError("config.json use_sliding_window=true: sliding-window attention unsupported")
  scaling = hf.get("rope_scaling")
  if scaling is not None:
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "default":
      scaling = None
    elif rope_type == "llama3":
      scaling = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                 float(scaling["high_freq_factor"]),
                 int(scaling["original_max_position_embeddings"]))
    else:
      raise ValueError(f"config.json rope_scaling type {rope_type!r}; expected 'llama3'")
  vocab = hf.get("vlbpe_vocab") or {"text_vocab": hf["vocab_size"]}
  fields = dict(
      width=hf["hidden_size"], depth=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
      mlp_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=float(hf.get("rope_theta", 10_000.0)), rope_scaling=scaling,
      qkv_bias=kind == "qwen2" or (kind == "qwen3" and bool(hf.get("attention_bias"))),
      qk_norm=kind == "qwen3", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      **{k: int(vocab.get(k, 0)) for k in _VOCAB_KEYS})
  return lm_config.LMConfig(**{**fields, **overrides})


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
  if cfg.visual_vocab:
    out["vlbpe_vocab"] = {k: getattr(cfg, k) for k in _VOCAB_KEYS}
  return out
