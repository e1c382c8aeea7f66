"""VQ-GAN losses: reconstruction, PatchGAN hinge, and the adaptive GAN weight.

Images are float in [-1, 1], [B, H, W, 3]; every loss is a float32 scalar.
"""

import chex
import jax
import jax.numpy as jnp

RECON_LOSSES = ("l1", "l2")


def reconstruction(x, x_rec, kind: str = "l1"):
  """Mean absolute (l1) or squared (l2) error."""
  chex.assert_equal_shape([x, x_rec])
  if kind not in RECON_LOSSES:
    raise ValueError(f"vq.recon_loss={kind!r} unknown; expected one of {RECON_LOSSES}")
  d = x_rec.astype(jnp.float32) - x.astype(jnp.float32)
  return jnp.mean(jnp.abs(d)) if kind == "l1" else jnp.mean(jnp.square(d))


def hinge_d_loss(logits_real, logits_fake):
  """Discriminator hinge loss: mean(relu(1 - D(x))) and mean(relu(1 + D(G(z)))), halved."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) +
                jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake):
  """Generator loss -mean(D(G(z)))."""
  return -jnp.mean(logits_fake)


def adaptive_weight(grad_rec, grad_gan, max_weight: float = 1e4):
  """taming's lambda = |dL_rec/dW| / (|dL_gan/dW| + 1e-4), W the decoder's last layer.

  Gradients are pytrees; the result carries no gradient.
  """
  norm = lambda g: jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g)))
  w = norm(grad_rec) / (norm(grad_gan) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


def adaptive_gan_term(nll_of, gan_of, w_last, g_loss, step, *, disc_weight: float,
                      disc_start: int):
  """taming's generator GAN term: disc_weight * [step >= disc_start] * lambda * g_loss.

  nll_of(w), gan_of(w): the reconstruction (+ perceptual) loss and the generator hinge loss as
  functions of the decoder's last layer parameters w alone (its input features held), so that
  lambda = `adaptive_weight(dnll/dw, dgan/dw)`; g_loss: the hinge loss through the whole model,
  which carries the generator's gradient. Returns (term, lambda).
  """
  weight = adaptive_weight(jax.grad(nll_of)(w_last), jax.grad(gan_of)(w_last))
  factor = disc_weight * (jnp.asarray(step) >= disc_start).astype(jnp.float32)
  return factor * weight * g_loss, weight
