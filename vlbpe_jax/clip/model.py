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

import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlbpe_jax.clip import towers
from vlbpe_jax.clip.config import (OPENAI_MEAN, OPENAI_STD, VARIANTS, CLIPConfig,  # noqa: F401
                                   config_for)  # (re-exported)


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
