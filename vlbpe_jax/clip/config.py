"""CLIP sizes: the frozen `CLIPConfig`, the `VARIANTS` table and `config_for` (model.py
re-exports them)."""

import dataclasses

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  image_size: int = 64  # R; R / patch_size = 8 gives the 8x8 feature grid BLIP3-o targets
  patch_size: int = 8
  # Convolutional stem (ViTc, Xiao et al. 2021, "Early convolutions help transformers see
  # better"): the widths of 3x3 stride-2 convs (+ GELU) that replace the linear patchify, one per
  # halving of patch_size (so len == log2(patch_size)), then a 1x1 conv to `width`. () = the
  # OpenAI layout (one p x p conv), the only one hf.py loads and saves.
  conv_stem: tuple[int, ...] = ()
  width: int = 64  # image tower D
  depth: int = 2
  heads: int = 4
  mlp_dim: int | None = None  # None: 4 * width
  text_width: int = 64
  text_depth: int = 2
  text_heads: int = 4
  text_mlp_dim: int | None = None  # None: 4 * text_width
  vocab_size: int = 512  # the project's sentencepiece vocab (configs/tiny.py)
  context_len: int = 64  # T; the longest shapes caption (4 objects) is ~50 pieces
  embed_dim: int = 64  # E, the joint embedding
  act: str = "quick_gelu"  # "quick_gelu" (OpenAI) | "gelu" (exact erf)
  norm_eps: float = 1e-5
  image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  dtype: str = "float32"  # compute
  param_dtype: str = "float32"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def vision_mlp(self) -> int:
    return self.mlp_dim or 4 * self.width

  @property
  def text_mlp(self) -> int:
    return self.text_mlp_dim or 4 * self.text_width


# Sizes; "B/16" are ViT-B/16's numbers (openai/clip-vit-base-patch16), for documentation and
# for loading such a checkpoint with hf.load_clip (which reads them from config.json).
VARIANTS = {
    "tiny": dict(width=32, depth=1, heads=2, text_width=32, text_depth=1, text_heads=2,
                 embed_dim=32),
    "mu": dict(width=64, depth=2, heads=4, text_width=64, text_depth=2, text_heads=4,
               embed_dim=64),
    "S": dict(width=384, depth=12, heads=6, text_width=384, text_depth=12, text_heads=6,
              embed_dim=384),
    "B/16": dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, text_width=512,
                 text_depth=12, text_heads=8, vocab_size=49408, context_len=77, embed_dim=512,
                 image_mean=OPENAI_MEAN, image_std=OPENAI_STD),
}


def config_for(variant: str, **overrides) -> CLIPConfig:
  """`CLIPConfig` of `VARIANTS[variant]` with `overrides` (any CLIPConfig field)."""
  if variant not in VARIANTS:
    raise ValueError(f"clip variant={variant!r} unknown; expected one of {sorted(VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(CLIPConfig)}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"clip config overrides {bad} unknown; expected fields of {sorted(fields)}")
  cfg = CLIPConfig(**{**VARIANTS[variant], **overrides})
  if cfg.image_size % cfg.patch_size:
    raise ValueError(f"image_size={cfg.image_size} is not a multiple of "
                     f"patch_size={cfg.patch_size}")
  if cfg.conv_stem:
    cfg = dataclasses.replace(cfg, conv_stem=tuple(int(w) for w in cfg.conv_stem))
    if (2 ** len(cfg.conv_stem) != cfg.patch_size or min(cfg.conv_stem) < 1):
      raise ValueError(f"conv_stem={cfg.conv_stem}: expected log2(patch_size={cfg.patch_size}) "
                       "positive widths (one stride-2 conv per halving), or () for none")
  return cfg
