"""The tiny DiT of tests/test_dit_train.py and tests/test_multiprocess.py (its worker): config
fields, 8 examples of 2 captions with 2x2x4 targets, and a stand-in frozen backbone (a 1-layer
LM at its init, reading captions through a one-id-per-character tokenizer)."""

import jax
import jax.numpy as jnp
import numpy as np

from vlbpe_jax import parallel
from vlbpe_jax.dit import train
from vlbpe_jax.lm import model as lm_model

CAPTIONS = [["a red circle.", "one red circle."], ["a blue star.", "one blue star."],
            ["a green square.", "one green square."], ["a cyan heart.", "one cyan heart."]] * 2


class CharTokenizer:
  """Stands in for the text tokenizer of the DiT's frozen LM: one id per character."""
  bos_id = 1

  def encode(self, text):
    return [3 + ord(ch) % 30 for ch in text]


def configure(config, **dit):
  """`config` (configs/tiny.py:tiny) with the tiny DiT's fields, then `dit.<k> = v`."""
  c = config.dit
  c.prompt_template, c.prompt_len, c.num_queries = "{caption}", 24, 4
  c.batch_size = 8
  config.clip.grid = 2  # 2x2 target tokens: one per query for the mse design
  for k, v in dit.items():
    c[k] = v
  return config


def targets(n=8, shape=(2, 2, 4)):
  return np.random.default_rng(0).normal(2.0, 3.0, (n,) + shape).astype(np.float32)


def lm():
  """(model, host params) of the frozen LM: 1 layer, width 32, 40 text ids, at its init."""
  model = lm_model.LM(lm_model.lm_config("mu", text_vocab=40, width=32, num_heads=2,
                                         num_kv_heads=2, mlp_dim=64, depth=1, dtype="float32"))
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, jax.tree.map(np.asarray, params)


def backbone(lm_and_params, mesh) -> train.Backbone:
  """The frozen backbone on `mesh` (params replicated over every process's devices)."""
  model, params = lm_and_params
  return train.Backbone(model, parallel.replicate(params, mesh), CharTokenizer(), False)
