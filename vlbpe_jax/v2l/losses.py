"""V2L tokenizer losses: L1 + quantisation + perceptual + adaptive hinge GAN (delayed start).

As the public code (models_v2l.py `forward`, step4 defaults): loss = L1 + rate_q * q_loss +
rate_p * LPIPS + rate_d * lambda * g_loss once the step reaches `disc_start`, where lambda is
taming's adaptive weight at the decoder's last conv (rate_q 1, rate_p 0.1, rate_d 0.75,
disc_start 10k). The public code starts the GAN at step > disc_start; vq's `>=` is reused. The
perceptual term needs real LPIPS weights (vq/perceptual.py); without them it is left out (never
a randomly initialised network). The pure pieces are vq/losses.py's and vq/perceptual.py's.
"""

import dataclasses

import chex
import jax.numpy as jnp

from vlbpe_jax.vq import autoencoder
from vlbpe_jax.vq import losses as vq_losses
from vlbpe_jax.vq import perceptual


@dataclasses.dataclass(frozen=True)
class LossConfig:
  recon: str = "l1"  # vq_losses.RECON_LOSSES
  quant_weight: float = 1.0  # rate_q
  perceptual_weight: float = 0.1  # rate_p, used only when LPIPS weights are given
  disc_weight: float = 0.75  # rate_d, scales the adaptive weight; 0: no GAN
  disc_start: int = 10_000


def nll(x, x_rec, lpips_params, cfg: LossConfig):
  """Reconstruction (+ perceptual_weight * LPIPS when lpips_params is not None): scalar."""
  out = vq_losses.reconstruction(x, x_rec, cfg.recon)
  if lpips_params is not None:
    out += cfg.perceptual_weight * jnp.mean(perceptual.lpips(lpips_params, x, x_rec))
  return out


def decoder_features(intermediates):
  """The features entering the decoder's conv_out, from `mutable=["intermediates"]`."""
  return intermediates["intermediates"]["decoder"]["features"][0]


def generator_loss(x, x_rec, quant_loss, step, *, cfg: LossConfig, lpips_params=None,
                   disc_fn=None, features=None, conv_out_params=None, patch: int = 1):
  """x, x_rec: [B, H, W, 3] in [-1, 1]; quant_loss: scalar; step: int scalar.

  With `disc_fn` (images -> PatchGAN logits, its params closed over) also give `features`
  (`decoder_features`), `conv_out_params` (params["decoder"]["conv_out"]) and the decoder's
  `patch`, for the adaptive weight. Returns (loss, metrics); with `disc_fn` the metrics also hold
  `g_loss`, `adaptive_weight` and `gan_loss` (the GAN term of `loss`, 0 before `disc_start`).
  """
  chex.assert_equal_shape([x, x_rec])
  rec = nll(x, x_rec, lpips_params, cfg)
  loss = rec + cfg.quant_weight * quant_loss
  m = {"rec_loss": vq_losses.reconstruction(x, x_rec, cfg.recon), "nll": rec,
       "quant_loss": quant_loss}
  if disc_fn is not None and cfg.disc_weight > 0:
    if features is None or conv_out_params is None:
      raise ValueError("generator_loss with disc_fn needs features and conv_out_params")
    last = autoencoder.decoder_conv_out(conv_out_params["kernel"].shape[-1], features.dtype)
    x_of = lambda w: autoencoder.depth_to_space(last.apply({"params": w}, features),
                                                patch).astype(jnp.float32)
    g_loss = vq_losses.hinge_g_loss(disc_fn(x_rec))
    gan, weight = vq_losses.adaptive_gan_term(
        lambda w: nll(x, x_of(w), lpips_params, cfg), lambda w: vq_losses.hinge_g_loss(
            disc_fn(x_of(w))), conv_out_params, g_loss, step, disc_weight=cfg.disc_weight,
        disc_start=cfg.disc_start)
    loss += gan
    m.update(g_loss=g_loss, adaptive_weight=weight, gan_loss=gan)
  return loss, dict(m, loss=loss)


def discriminator_loss(logits_real, logits_fake, step, *, cfg: LossConfig):
  """Hinge loss, zero before `disc_start` (the discriminator waits with the generator term)."""
  return ((jnp.asarray(step) >= cfg.disc_start).astype(jnp.float32)
          * vq_losses.hinge_d_loss(logits_real, logits_fake))
