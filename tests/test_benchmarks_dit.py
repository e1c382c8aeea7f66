"""benchmarks/dit_bench.py: its FLOP formula against the traced matmuls and XLA's cost analysis."""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_main import ROOT
from vlbpe_jax import sharded_trainer
from vlbpe_jax.dit import model as dit_model

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # dit_bench imports lm_bench beside it
import dit_bench  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def dot_flops(jaxpr):
  """2 * multiply-adds of every dot_general in a jaxpr, sub-jaxprs included."""
  n = 0
  for e in jaxpr.eqns:
    if e.primitive.name == "dot_general":
      (_, rc), (_, rb) = e.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in e.invars)
      n += 2 * int(np.prod(lhs)) * int(np.prod(
          [s for i, s in enumerate(rhs) if i not in rc and i not in rb]))
    for p in e.params.values():
      for sub in p if isinstance(p, (list, tuple)) else [p]:
        if hasattr(sub, "eqns"):
          n += dot_flops(sub)
        elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
          n += dot_flops(sub.jaxpr)
  return n


def inputs(c, b, q):
  return (jnp.zeros((b,) + c.grid + (c.in_channels,)), jnp.zeros((b,)),
          jnp.zeros((b, q, c.cond_dim)), jnp.ones((b, q), bool))


def abstract_params(net, args):
  return jax.eval_shape(lambda: nn.unbox(net.init(jax.random.key(0), *args)["params"]))


@pytest.mark.parametrize("over,q", [
    (dict(), 64),
    (dict(grid=(8, 8), in_channels=64, cond_dim=128), 64),  # the demo's DiT
    (dict(grid=(8, 8), patch_size=2, depth=3), 5),
])
def test_forward_flops_equal_the_traced_matmuls(over, q):
  c = dit_model.config_for("tiny", **over)
  net, args = dit_model.DiT(c), inputs(c, 2, q)
  jaxpr = jax.make_jaxpr(lambda p, *a: net.apply({"params": p}, *a))(
      abstract_params(net, args), *args)
  assert dit_bench.forward_flops(c, q)[0] * 2 == dot_flops(jaxpr.jaxpr)


def test_train_step_flops_within_10_percent_of_xla():
  c = dit_model.config_for("tiny", grid=(8, 8), in_channels=64, cond_dim=128)
  b, q = 8, 64
  net = dit_model.DiT(c)
  x0, _, cond, _ = inputs(c, b, q)
  params = abstract_params(net, inputs(c, b, q))
  tx = sharded_trainer.adamw_cosine(lr=1e-4, total_steps=10, warmup_steps=1, final_lr=1e-5)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
           "opt": jax.eval_shape(tx.init, params)}
  cost = dit_bench.make_step(net, tx).lower(state, {"x0": x0, "cond": cond},
                                            jax.random.key(0)).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ours = 3 * b * dit_bench.forward_flops(c, q)[0]
  assert ours == pytest.approx(float(cost["flops"]), rel=0.1)


def test_dit_condition_oracle_tokens_name_each_cell():
  import dit_condition  # pylint: disable=g-import-not-at-top
  scene = [{"shape": "star", "color": "blue", "size": "small", "position": "bottom-right"},
           {"shape": "circle", "color": "red", "size": "large", "position": "top-left"}]
  t = dit_condition.oracle_tokens([scene, []], 32) / 3.0
  assert t.shape == (2, 9, 32)
  np.testing.assert_array_equal(np.nonzero(t[0, 8])[0], [2, 8 + 5, 14, 16 + 8])  # blue star
  np.testing.assert_array_equal(np.nonzero(t[0, 0])[0], [0, 8 + 1, 15, 16])  # large red circle
  np.testing.assert_array_equal(np.nonzero(t[0, 4])[0], [16 + 4])  # an empty cell: its index
  np.testing.assert_array_equal(t[1, :, :16], 0.0)


def test_dit_condition_word_tokens_follow_the_caption_order():
  import dit_condition  # pylint: disable=g-import-not-at-top
  scene = [{"shape": "star", "color": "blue", "size": "small", "position": "bottom-right"},
           {"shape": "circle", "color": "red", "size": "large", "position": "top-left"}]
  t = dit_condition.word_tokens([scene], 40)[0] / 3.0
  assert t.shape == (12, 40)
  want = [[2, 25], [8 + 5, 14, 26], [16 + 8, 27], [0, 28], [8 + 1, 15, 29], [16, 30]]
  for slot, cols in enumerate(want):
    np.testing.assert_array_equal(np.nonzero(t[slot])[0], cols)
  np.testing.assert_array_equal(np.nonzero(t[6])[0], [31])  # an empty slot: its index only
  with pytest.raises(ValueError, match="expected one of"):
    dit_condition.main(["/tmp/x", "fm", "/tmp/y", "--oracle=nouns"])


def test_dit_condition_cell_labels_name_each_cell_and_flags_are_checked():
  import dit_condition  # pylint: disable=g-import-not-at-top
  scene = [{"shape": "star", "color": "blue", "size": "small", "position": "bottom-right"},
           {"shape": "circle", "color": "red", "size": "large", "position": "top-left"}]
  labels = dit_condition.cell_labels([scene, []])
  assert labels.shape == (2, 9, 3)
  np.testing.assert_array_equal(labels[0, 8], [1 + 2, 1 + 5, 1 + 0])  # small blue star
  np.testing.assert_array_equal(labels[0, 0], [1 + 0, 1 + 1, 1 + 1])  # large red circle
  np.testing.assert_array_equal(labels[0, 1:8], 0)  # empty cells
  np.testing.assert_array_equal(labels[1], 0)
  assert np.all(labels.max(axis=(0, 1)) < np.array(dit_condition.BIND_CLASSES))
  for bad in (["--oracle", "--bind_loss=1"], ["--oracle=words", "--train_backbone"],
              ["--train_backbon"], ["--oracles"]):
    with pytest.raises(ValueError, match="oracle|expected"):
      dit_condition.main(["/tmp/x", "fm", "/tmp/y", *bad])
