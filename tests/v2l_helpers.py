"""Shared tiny fixtures of the V2L tests: a sentencepiece LM tokenizer and a CLIP, built once.

Parameters are initialised from `key(seed)`: an "rbg" key, whose initialisers compile in a few
seconds on a CPU where threefry's take ~30 s for the V2L model (the values do not matter here).
"""

import functools
import random
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlbpe_jax.clip import model as clip_model
from vlbpe_jax.data.text_tokenizer import TextTokenizer

_WORDS = "red green blue circle square triangle small large the a of is on left right".split()


@functools.cache
def tokenizer() -> TextTokenizer:
  """A 300-piece unigram model (byte fallback, control pieces) on shape-like sentences."""
  r = random.Random(0)
  texts = [" ".join(r.choice(_WORDS) for _ in range(r.randint(3, 9))) + "." for _ in range(400)]
  with tempfile.TemporaryDirectory(prefix="v2l_tok_") as tmp:  # the tokenizer holds its model
    return TextTokenizer.train(texts, vocab_size=300, model_path=tmp + "/t.model")


@functools.cache
def clip(embed_dim: int = 16):
  """(model, params) of a tiny CLIP on 8 px images (2x2 patches of 4) with our tokenizer."""
  cfg = clip_model.config_for("tiny", image_size=8, patch_size=4, context_len=16,
                              vocab_size=tokenizer().vocab_size, embed_dim=embed_dim)
  model = clip_model.CLIP(cfg)
  ids = jnp.ones((1, cfg.context_len), jnp.int32)
  params = jax.jit(model.init)(key(0), jnp.zeros((1, 8, 8, 3)), ids)["params"]
  return model, nn.unbox(params)


def encode(text: str) -> list[int]:
  """The CLIP tower's text -> ids (EOS last, never the pad id 0)."""
  return tokenizer().encode(text, add_eos=True)


def key(seed: int):
  """A PRNG key for test initialisation (see the module docstring)."""
  return jax.random.key(seed, impl="rbg")
