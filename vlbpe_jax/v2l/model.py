"""V2LTokenizer: VQGAN encoder -> local LM-subword quantiser -> decoder with global cross-attn.

  model = V2LTokenizer(config_for("demo", embed_dim=clip_cfg.embed_dim))
  params = nn.unbox(model.init(key, x, local_emb, g, g_mask)["params"])
  x_rec, aux = model.apply({"params": params}, x, local_emb, g, g_mask)      # training path
  v = {"params": params}
  z_q, idx, loss, aux = model.apply(v, x, local_emb, method="encode")      # idx: [B, h, w]
  x_rec = model.apply(v, idx, local_emb, g, g_mask, method="decode_ids")   # restoration

Images are float32 in [-1, 1], [B, R, R, 3], R divisible by the downsampling f. `local_emb`
[V, E] is the frozen CLIP-text table of the LM subwords (codebook.embed_texts) and is an INPUT,
never a parameter: the only codebook parameter is `projector` (Linear E -> d). `global_emb`
[B, Kg, E] are the frozen CLIP-text embeddings of each image's global entries (not projected,
as the public code), `global_mask` [B, Kg] bool which of them exist (all False: no global
tokens). The frozen CLIP image tower that picks the global entries stays outside this module.
Trainable: encoder, quant_conv, projector, post_quant_conv, decoder.
"""

import dataclasses

import chex
import flax.linen as nn
import jax.numpy as jnp

from vlbpe_jax.v2l import decoder as decoder_lib
from vlbpe_jax.v2l import quantizer
from vlbpe_jax.vq import autoencoder
from vlbpe_jax.vq import layers


@dataclasses.dataclass(frozen=True)
class V2LConfig:
  image_size: int = 64  # R
  ch: int = 32  # VQGAN base width
  ch_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; f = patch * 2^(levels-1)
  num_res_blocks: int = 1
  z_channels: int = 64  # encoder conv_out / decoder conv_in width
  groups: int = 8  # GroupNorm groups
  attn_levels: tuple[int, ...] = ()
  patch: int = 2  # pixels per side folded into channels first (vq/autoencoder.py)
  code_dim: int = 64  # d: quantised feature width (768 in the paper)
  embed_dim: int = 64  # E: CLIP's joint embedding (local table and global rows)
  cross_heads: int = 4
  cross_head_dim: int | None = None  # None: the mid-block width (public code)
  beta: float = quantizer.BETA
  dtype: str = "float32"
  param_dtype: str = "float32"  # own layers (projector, cross-attn); vq blocks keep float32

  @property
  def downsample(self) -> int:
    return self.patch * 2 ** (len(self.ch_mult) - 1)

  @property
  def grid(self) -> int:
    return self.image_size // self.downsample


VARIANTS = {
    # Tests: 16 px -> 4x4.
    "tiny": dict(image_size=16, ch=8, ch_mult=(1, 2), z_channels=16, groups=4, patch=2,
                 code_dim=16, embed_dim=16, cross_heads=2, cross_head_dim=8),
    # The demo: 64 px -> 16x16 with x4 downsampling (2x2 patches, then one x2 level): the
    # paper's map size (its x8 is at 128 px), on which the restoration protocol is defined
    # (centre 8x8 of 16x16, n = 16). At x8 (8x8 maps, until 2026-12-05) the tokenizer stayed
    # below the corrupted images' PSNR and no restoration could gain (BENCHMARKS.md).
    "demo": dict(image_size=64, ch=32, ch_mult=(1, 2), z_channels=64, groups=8, patch=2,
                 code_dim=64, embed_dim=64, cross_heads=4),
    # The public code (vqgan_configs/v2l.yaml + models_v2l.py): 128 px -> 16x16, d = E = 768.
    "paper": dict(image_size=128, ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2,
                  z_channels=256, groups=32, patch=1, code_dim=768, embed_dim=768,
                  cross_heads=8),
}


def config_for(variant: str, **overrides) -> V2LConfig:
  """`V2LConfig` of `VARIANTS[variant]` with `overrides`; checks the image size."""
  if variant not in VARIANTS:
    raise ValueError(f"v2l variant={variant!r} unknown; expected one of {sorted(VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(V2LConfig)}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"v2l config overrides {bad} unknown; expected fields of {sorted(fields)}")
  cfg = V2LConfig(**{**VARIANTS[variant], **overrides})
  if cfg.image_size % cfg.downsample:
    raise ValueError(f"image_size={cfg.image_size} is not divisible by the downsampling "
                     f"{cfg.downsample} (patch={cfg.patch}, ch_mult={cfg.ch_mult})")
  return cfg


class V2LTokenizer(nn.Module):
  config: V2LConfig

  def setup(self):
    c = self.config
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    blocks = dict(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, groups=c.groups,
                  attn_levels=c.attn_levels, patch=c.patch, dtype=dt)
    self.encoder = autoencoder.Encoder(z_channels=c.z_channels, **blocks)
    self.quant_conv = layers.conv(c.code_dim, 1, dtype=dt)
    self.projector = quantizer.Projector(c.code_dim, dt, pdt)
    self.post_quant_conv = layers.conv(c.z_channels, 1, dtype=dt)
    self.decoder = decoder_lib.V2LDecoder(z_channels=c.z_channels, cross_heads=c.cross_heads,
                                          cross_head_dim=c.cross_head_dim, param_dtype=pdt,
                                          **blocks)

  def _check_table(self, local_emb):
    chex.assert_rank(local_emb, 2)
    if local_emb.shape[1] != self.config.embed_dim:
      raise ValueError(f"local_emb shape {local_emb.shape}: expected [V, "
                       f"embed_dim={self.config.embed_dim}] (the CLIP text embedding width)")

  def codebook(self, local_emb):
    """local_emb [V, E] (frozen) -> projected local codebook [V, d] float32."""
    self._check_table(local_emb)
    return self.projector(local_emb)

  def encode(self, images, local_emb):
    """images [B, R, R, 3] -> (z_q [B, h, w, d], idx int32 [B, h, w], quant loss, aux)."""
    c = self.config
    chex.assert_rank(images, 4)
    if images.shape[-1] != 3 or images.shape[1] % c.downsample or images.shape[2] % c.downsample:
      raise ValueError(f"images shape {images.shape}: expected [B, H, W, 3] with H and W "
                       f"divisible by the downsampling {c.downsample}")
    z = self.quant_conv(self.encoder(images)).astype(jnp.float32)  # [B, h, w, d]
    return quantizer.quantize_local(z, self.codebook(local_emb), beta=c.beta)

  def decode(self, z_q, global_emb, global_mask):
    """z_q [B, h, w, d], global_emb [B, Kg, E], global_mask [B, Kg] bool -> [B, H, W, 3]."""
    chex.assert_rank([z_q, global_emb, global_mask], [4, 3, 2])
    if global_emb.shape[-1] != self.config.embed_dim:
      raise ValueError(f"global_emb shape {global_emb.shape}: expected [B, Kg, "
                       f"embed_dim={self.config.embed_dim}]")
    chex.assert_type(global_mask, bool)
    h = self.post_quant_conv(z_q.astype(jnp.dtype(self.config.dtype)))
    return self.decoder(h, global_emb, global_mask)

  def decode_ids(self, idx, local_emb, global_emb, global_mask):
    """idx int [B, h, w] local codebook indices (not LM ids) -> images [B, H, W, 3]."""
    chex.assert_rank(idx, 3)
    z_q = jnp.take(self.codebook(local_emb), idx, axis=0)  # [B, h, w, d]
    return self.decode(z_q, global_emb, global_mask)

  def __call__(self, images, local_emb, global_emb, global_mask):
    """Training path -> (x_rec [B, H, W, 3], aux: idx, quant_loss, z, counts, usage, perplexity).
    decode_ids(aux["idx"], ...) gives the same images (same code vectors)."""
    z_q, idx, quant_loss, aux = self.encode(images, local_emb)
    return self.decode(z_q, global_emb, global_mask), dict(aux, idx=idx, quant_loss=quant_loss)
