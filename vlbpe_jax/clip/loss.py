"""Symmetric InfoNCE (CLIP's loss) on L2-normalised embeddings with a learnable temperature."""

import chex
import jax.numpy as jnp
import optax

MAX_SCALE = 100.0  # OpenAI CLIP clamps exp(logit_scale) at 100


def normalize(x, eps=1e-6):
  """x `[..., E]` / its L2 norm (float32)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def clip_loss(img_emb, txt_emb, logit_scale):
  """img_emb, txt_emb: `[B, E]` (row i of each is a pair); logit_scale: `[]` (log scale).

  Returns `(loss, metrics)`: loss = mean of the image->text and text->image cross-entropies of
  `logits[i, j] = scale * cos(img_i, txt_j)`, scale = min(exp(logit_scale), 100). metrics: loss,
  i2t_acc / t2i_acc (top-1 retrieval in the batch), scale, temperature = 1 / scale.
  """
  chex.assert_rank([img_emb, txt_emb], 2)
  chex.assert_equal_shape([img_emb, txt_emb])
  chex.assert_shape(logit_scale, ())
  scale = jnp.minimum(jnp.exp(logit_scale.astype(jnp.float32)), MAX_SCALE)
  logits = scale * jnp.einsum("BE,CE->BC", normalize(img_emb), normalize(txt_emb))  # [B, B]
  labels = jnp.arange(logits.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  loss = (i2t + t2i) / 2
  metrics = {
      "loss": loss,
      "i2t_acc": jnp.mean(jnp.argmax(logits, axis=1) == labels),
      "t2i_acc": jnp.mean(jnp.argmax(logits, axis=0) == labels),
      "scale": scale,
      "temperature": 1.0 / scale,
  }
  return loss, metrics
