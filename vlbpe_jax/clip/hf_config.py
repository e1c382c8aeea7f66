"""Hugging Face CLIPModel config.json <-> CLIPConfig (sizes, activation, norm eps).

Fields missing from config.json take transformers' CLIPTextConfig / CLIPVisionConfig defaults
(ViT-B/32 sizes), as transformers itself does for old, sparse configs. One activation and one
LayerNorm eps serve both towers here; a config whose towers differ is refused.
"""

from vlbpe_jax.clip import config as clip_config

_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, image_size=224, patch_size=32, num_channels=3,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5)
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5)


def config_from_hf(hf, source="config.json", **overrides):
  """CLIPConfig from a CLIPModel config.json dict (+ CLIPConfig field overrides)."""
  if not isinstance(hf, dict):
    raise ValueError(f"{source}: expected a JSON object with text_config and vision_config")
  vis = {**_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
  txt = {**_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
  problems = [f"{name}={a!r} in vision_config but {b!r} in text_config"
              for name, a, b in (("hidden_act", vis["hidden_act"], txt["hidden_act"]),
                                 ("layer_norm_eps", vis["layer_norm_eps"],
                                  txt["layer_norm_eps"])) if a != b]
  if vis["hidden_act"] not in ("quick_gelu", "gelu"):
    problems.append(f"hidden_act={vis['hidden_act']!r}; expected 'quick_gelu' or 'gelu'")
  if vis["num_channels"] != 3:
    problems.append(f"vision_config.num_channels={vis['num_channels']}; expected 3")
  if problems:
    raise ValueError(f"{source}: " + "; ".join(problems))
  fields = dict(
      image_size=vis["image_size"], patch_size=vis["patch_size"], width=vis["hidden_size"],
      depth=vis["num_hidden_layers"], heads=vis["num_attention_heads"],
      mlp_dim=vis["intermediate_size"], text_width=txt["hidden_size"],
      text_depth=txt["num_hidden_layers"], text_heads=txt["num_attention_heads"],
      text_mlp_dim=txt["intermediate_size"], vocab_size=txt["vocab_size"],
      context_len=txt["max_position_embeddings"], embed_dim=hf.get("projection_dim", 512),
      act=vis["hidden_act"], norm_eps=vis["layer_norm_eps"])
  return clip_config.CLIPConfig(**{**fields, **overrides})


def config_to_hf(cfg):
  """CLIPModel config.json dict of `cfg` (what transformers' CLIPModel reads)."""
  common = dict(hidden_act=cfg.act, layer_norm_eps=cfg.norm_eps)
  return {
      "model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": cfg.embed_dim,
      "logit_scale_init_value": 2.6592,
      "vision_config": dict(hidden_size=cfg.width, intermediate_size=cfg.vision_mlp,
                            num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                            image_size=cfg.image_size, patch_size=cfg.patch_size,
                            num_channels=3, **common),
      "text_config": dict(vocab_size=cfg.vocab_size, hidden_size=cfg.text_width,
                          intermediate_size=cfg.text_mlp, num_hidden_layers=cfg.text_depth,
                          num_attention_heads=cfg.text_heads,
                          max_position_embeddings=cfg.context_len, **common),
  }
