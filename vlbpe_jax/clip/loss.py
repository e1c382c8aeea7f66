"""Symmetric InfoNCE (CLIP's loss) on L2-normalised embeddings with a learnable temperature,
optionally with hard-negative captions (NegCLIP, Yuksekgonul et al. 2023)."""

import chex
import jax.numpy as jnp
import optax

MAX_SCALE = 100.0  # OpenAI CLIP clamps exp(logit_scale) at 100


def normalize(x, eps=1e-6):
  """x `[..., E]` / its L2 norm (float32)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def clip_loss(img_emb, txt_emb, logit_scale, neg_emb=None):
  """img_emb, txt_emb: `[B, E]` (row i of each is a pair); logit_scale: `[]` (log scale);
  neg_emb: optional `[B, E]`, row i a caption that is wrong for image i by one word.

  Returns `(loss, metrics)`: loss = mean of the image->text and text->image cross-entropies of
  `logits[i, j] = scale * cos(img_i, txt_j)`, scale = min(exp(logit_scale), 100). With
  `neg_emb`, the image->text softmax of every image also runs over all B negatives (extra
  columns, as NegCLIP appends its swapped captions to the batch), so a caption that differs
  from the right one in a single attribute is pushed away; text->image is unchanged (a negative
  has no image). metrics: loss, i2t_acc / t2i_acc (top-1 retrieval in the batch), scale,
  temperature = 1 / scale, and with negatives hard_neg_acc: the share of images closer to their
  caption than to their own negative.
  """
  chex.assert_rank([img_emb, txt_emb], 2)
  chex.assert_equal_shape([img_emb, txt_emb])
  chex.assert_shape(logit_scale, ())
  scale = jnp.minimum(jnp.exp(logit_scale.astype(jnp.float32)), MAX_SCALE)
  img = normalize(img_emb)
  logits = scale * jnp.einsum("BE,CE->BC", img, normalize(txt_emb))  # [B, B]
  labels = jnp.arange(logits.shape[0])
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  metrics = {}
  i2t_logits = logits
  if neg_emb is not None:
    chex.assert_equal_shape([img_emb, neg_emb])
    neg = scale * jnp.einsum("BE,CE->BC", img, normalize(neg_emb))  # [B, B]
    i2t_logits = jnp.concatenate([logits, neg], axis=1)  # [B, 2B]
    metrics["hard_neg_acc"] = jnp.mean(jnp.diagonal(logits) > jnp.diagonal(neg))
  i2t = optax.softmax_cross_entropy_with_integer_labels(i2t_logits, labels).mean()
  loss = (i2t + t2i) / 2
  metrics.update({
      "loss": loss,
      "i2t_acc": jnp.mean(jnp.argmax(i2t_logits, axis=1) == labels),
      "t2i_acc": jnp.mean(jnp.argmax(logits, axis=0) == labels),
      "scale": scale,
      "temperature": 1.0 / scale,
  })
  return loss, metrics
