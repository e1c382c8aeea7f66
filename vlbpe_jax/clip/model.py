"""Contrastive image-text model in the OpenAI-CLIP layout: ViT image tower, causal text tower.

  model = CLIP(config_for("tiny", vocab_size=512))
  params = nn.unbox(model.init(key, images, ids)["params"])
  img, txt, logit_scale = model.apply({"params": params}, images, ids)   # [B, E], [B, E], []
  feats = model.apply({"params": params}, images, method=CLIP.patch_features)  # [B, h, w, D]

Images are float in [-1, 1], `[B, R, R, 3]` with R == image_size (a multiple of patch_size).
They are mapped to the tower's pixel normalisation `((x + 1) / 2 - image_mean) / image_std`;
the defaults (0.5, 0.5) keep [-1, 1], a loaded OpenAI checkpoint sets OpenAI's mean/std (hf.py).
Text ids `[B, T]` (T <= context_len) carry pad id 0 after the sequence; the pooled text feature
is the one at the last non-pad token (the EOS, see text.py); it depends only on the tokens up
to it (causal attention), so padding changes nothing.
"""

import dataclasses

import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlbpe_jax.clip import towers

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  image_size: int = 64  # R; R / patch_size = 8 gives the 8x8 feature grid BLIP3-o targets
  patch_size: int = 8
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
  return cfg


class CLIP(nn.Module):
  """Image and text towers plus the learnable temperature `logit_scale` (init log(1/0.07))."""
  config: CLIPConfig

  def setup(self):
    self.visual = towers.VisionTower(self.config)
    self.text = towers.TextTower(self.config)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(np.log(1 / 0.07)),
                                                    ()), (), jnp.float32)

  def _pixels(self, images):
    c = self.config
    chex.assert_rank(images, 4)
    r = images.shape[1]
    if images.shape[1:] != (r, r, 3) or r != c.image_size or r % c.patch_size:
      raise ValueError(f"images shape {images.shape}: expected [B, {c.image_size}, "
                       f"{c.image_size}, 3] (image_size, a multiple of patch_size="
                       f"{c.patch_size})")
    mean, std = jnp.asarray(c.image_mean), jnp.asarray(c.image_std)
    return ((images.astype(jnp.float32) + 1) / 2 - mean) / std

  def patch_features(self, images):
    """images `[B, R, R, 3]` in [-1, 1] -> `[B, h, w, D]`: the last block's outputs at the patch
    tokens (CLS dropped, before ln_post), h = w = R / patch_size. BLIP3-o's target."""
    tokens = self.visual(self._pixels(images))  # [B, 1 + h*w, D]
    g = self.config.grid
    return tokens[:, 1:].reshape(tokens.shape[0], g, g, tokens.shape[-1])

  def encode_image(self, images):
    """images `[B, R, R, 3]` in [-1, 1] -> `[B, E]`, not normalised."""
    tokens = self.visual(self._pixels(images))  # [B, 1 + h*w, D]
    return self.visual.head(tokens[:, 0])

  def encode_text(self, ids):
    """ids `[B, T]` int, pad 0 after the EOS -> `[B, E]` at the last non-pad token."""
    chex.assert_rank(ids, 2)
    chex.assert_type(ids, int)
    if ids.shape[1] > self.config.context_len:
      raise ValueError(f"ids length {ids.shape[1]} > context_len={self.config.context_len}")
    return self.text(ids)

  def __call__(self, images, ids):
    """Returns `(img_emb [B, E], txt_emb [B, E], logit_scale [])`; embeddings not normalised."""
    return self.encode_image(images), self.encode_text(ids), self.logit_scale
