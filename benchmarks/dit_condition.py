"""Does the DiT follow its condition? One design of the BLIP3-o stage on a finished demo workdir,
with the LM's query states or an oracle condition, scored against its prompts and against the
next prompt's scene (`generation.wrong_prompt_control`).

  PYTHONPATH=.:tests .venv/bin/python benchmarks/dit_condition.py OUT DESIGN SRC \\
      [--oracle[=cells|words]] [config.key=value ...]
  e.g. ... dit_condition.py /tmp/dc/vq_oracle vq_latent runs/demo --oracle dit.total_steps=300

OUT gets links to SRC's data, tokenizer, VQ, BPE, LM, CLIP and pixel decoder and its own
`dit/<DESIGN>/` (a rerun resumes it); the design is trained and scored by the stage's own code
(`dit/stage._design`: the demo's prompts, samples, sampler and checker). `--oracle` replaces
the frozen LM's query states by the scene itself: one token per cell of the 3x3 layout (one-hot
colour, shape, size and cell index, x3, zero-padded to the LM's width), so the condition holds
everything the checker asks, in the cells it asks about. A generator that does not follow that
within its steps is limited by its own training, not by what the LM's states carry.
`--oracle=words` gives the same scene as words instead: three tokens per object in caption order
(colour; size and shape; cell), bound only by their slots, as a caption's words are. Prints one
JSON line.
`--train_backbone` trains the LM with the queries and the DiT (one pass over `[prompt;
queries]` with gradients into every LM weight, at `dit.lr`) instead of keeping it frozen:
does a backbone free to bind the caption's words give the DiT a condition it follows?
`--bind_loss=W` adds W x a supervised binding loss: the condition's first 9 states, one per cell
of the 3x3 layout, each read by a linear head (trained with them) as that cell's colour, shape
and size (or empty), cross-entropy against the scene. It teaches the queries (and with
`--train_backbone` the LM) to bind each object's words into the state of its cell, as the
per-cell oracle is bound, from the prompt alone: what a large pretrained backbone is assumed to
give BLIP3-o and this demo's LM does not. The JSON line then also holds the head's accuracy on
the scored test prompts (`bind_colour`, `bind_shape`, `bind_size` on occupied cells,
`bind_occupied` on all).
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from test_main import ROOT, load_config
from vlbpe_jax.data import shapes
from vlbpe_jax.dit import decoder as decoder_lib
from vlbpe_jax.dit import stage
from vlbpe_jax.dit import train
from vlbpe_jax.eval import generation

sys.path.insert(0, os.path.dirname(__file__))
from dit_sweep import _override, linked_workdir  # noqa: E402  pylint: disable=g-import-not-at-top


def cell_labels(scenes):
  """int32 [N, 9, 3]: per cell of the 3x3 layout, 1 + colour, 1 + shape, 1 + size (0 empty)."""
  out = np.zeros((len(scenes), 9, 3), np.int32)
  for i, objects in enumerate(scenes):
    for o in objects:
      k = shapes.POSITIONS.index(o["position"])
      out[i, k] = (1 + list(shapes.COLORS).index(o["color"]), 1 + shapes.SHAPES.index(o["shape"]),
                   1 + shapes.SIZES.index(o["size"]))
  return out


BIND_CLASSES = (1 + len(shapes.COLORS), 1 + len(shapes.SHAPES), 1 + len(shapes.SIZES))


def oracle_tokens(scenes, width):
  """[N, 9, width] float32: per cell, one-hot colour (8), shape (6), size (2), cell (9), x3
  (`cell_labels` laid out as one-hots)."""
  labels = cell_labels(scenes)
  starts = np.cumsum((0,) + tuple(c - 1 for c in BIND_CLASSES))  # colour, shape, size, cell
  out = np.zeros((len(scenes), 9, width), np.float32)
  n, k = np.nonzero(labels[..., 0])
  for j in range(3):
    out[n, k, starts[j] + labels[n, k, j] - 1] = 1.0
  out[:, np.arange(9), starts[3] + np.arange(9)] = 1.0
  return 3.0 * out


def word_tokens(scenes, width):
  """[N, 12, width] float32: the scene as words, three tokens per object in caption order
  (its colour; its size and shape; its cell), each with a one-hot of its slot (12), x3.
  Nothing binds an object's words but their slots, as in a caption."""
  out = np.zeros((len(scenes), 12, width), np.float32)
  colours = list(shapes.COLORS)
  for i, objects in enumerate(scenes):
    for j, o in enumerate(objects):
      out[i, 3 * j, colours.index(o["color"])] = 1.0
      out[i, 3 * j + 1, 8 + shapes.SHAPES.index(o["shape"])] = 1.0
      out[i, 3 * j + 1, 14 + shapes.SIZES.index(o["size"])] = 1.0
      out[i, 3 * j + 2, 16 + shapes.POSITIONS.index(o["position"])] = 1.0
    out[i, np.arange(12), 25 + np.arange(12)] = 1.0
  return 3.0 * out


ORACLES = {"cells": oracle_tokens, "words": word_tokens}


def use_oracle(ctx, kind="cells"):
  """Patches `train` so that the condition is `oracle_tokens` of each example's scene: the
  examples' and the test prompts' `ids` become the tokens, and `query_states` returns them."""
  width = ctx.backbone.model.config.width
  train_tokens = ORACLES[kind](ctx.train["objects"], width)
  test_tokens = ORACLES[kind](ctx.objects, width)

  class Examples(train._Examples):  # pylint: disable=protected-access
    def __call__(self, index, rng):
      tokens = train_tokens[int(index)]
      return {**super().__call__(index, rng), "ids": tokens,
              "mask": np.ones(tokens.shape[:1], bool)}

  real_encode = train.Backbone.encode

  def encode(self, captions, config):
    if list(captions) == list(ctx.prompts):  # the scored test prompts
      return test_tokens, np.ones(test_tokens.shape[:2], bool)
    return real_encode(self, captions, config)

  train._Examples = Examples  # pylint: disable=protected-access
  train.Backbone.encode = encode
  train.queries_lib = _OracleQueries()


class _OracleQueries:
  """Stands in for `dit.queries` inside `train`: the condition passed as `ids` is returned."""
  encode_prompts = staticmethod(train.queries_lib.encode_prompts)

  @staticmethod
  def query_states(lm, lm_params, queries, ids, mask, *, grid=False):
    del lm, lm_params, queries, mask, grid
    return jnp.asarray(ids, jnp.float32)


def train_backbone(ctx):
  """Patches `train` so that the LM's params train with the queries: they ride in the trained
  state as `params["queries"]["lm"]` (so the step, the checkpoint and `generate` carry them),
  and the condition is one pass over `[prompt; queries]` without `stop_gradient`."""
  lm_params = ctx.backbone.params
  real_init_fn = train.init_fn

  def init_fn(*args):
    init = real_init_fn(*args)

    def with_lm(key):
      p = init(key)
      return {"queries": {"q": p["queries"], "lm": lm_params}, "net": p["net"]}
    return with_lm

  train.init_fn = init_fn
  train.queries_lib = _TrainedBackbone()


class _TrainedBackbone:
  """Stands in for `dit.queries` inside `train`: the LM's params come with the queries."""
  encode_prompts = staticmethod(train.queries_lib.encode_prompts)

  @staticmethod
  def query_states(lm, lm_params, queries, ids, mask, *, grid=False):
    del lm_params  # the frozen copy: the trained one rides with the queries
    q, params = queries["q"], queries["lm"]
    b, n = ids.shape[0], q.shape[0]
    seg = jnp.concatenate([mask, jnp.ones((b, n), bool)], axis=1).astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    h = lm.apply({"params": params}, ids, positions=jnp.stack([pos, pos], -1) if grid else pos,
                 segment_ids=seg, extra_embeds=jnp.broadcast_to(q[None], (b,) + q.shape),
                 return_hidden=True)
    return h[:, -n:]


def bind_loss(ctx, weight):
  """Patches `train` so that the loss adds `weight` x the binding loss (module docstring)."""
  labels = cell_labels(ctx.train["objects"])
  real_examples = train._Examples  # pylint: disable=protected-access
  real_init_fn, real_loss_fn = train.init_fn, train.loss_fn
  classes = sum(BIND_CLASSES)

  class Examples(real_examples):
    def __call__(self, index, rng):
      return {**super().__call__(index, rng), "cells": labels[int(index)]}

  def init_fn(config, design, net, shape, cond_dim):
    init = real_init_fn(config, design, net, shape, cond_dim)

    def with_head(key):
      p = init(key)
      k = jax.random.fold_in(key, 7)
      return {**p, "bind": {"w": jax.random.normal(k, (cond_dim, classes)) / np.sqrt(cond_dim),
                            "b": jnp.zeros((classes,))}}
    return with_head

  def loss_fn(params, batch, key, backbone_params, *, design, net, backbone, config):
    flow_batch = {k: v for k, v in batch.items() if k != "cells"}
    loss, aux = real_loss_fn(params, flow_batch, key, backbone_params, design=design, net=net,
                             backbone=backbone, config=config)
    cond = train.queries_lib.query_states(backbone.model, backbone_params, params["queries"],
                                          batch["ids"], batch["mask"], grid=backbone.grid)
    logits = cond[:, :9].astype(jnp.float32) @ params["bind"]["w"] + params["bind"]["b"]
    ce, start = [], 0
    for j, n in enumerate(BIND_CLASSES):
      ce.append(optax.softmax_cross_entropy_with_integer_labels(
          logits[..., start:start + n], batch["cells"][..., j]).mean())
      start += n
    bind = sum(ce) / len(ce)
    return loss + weight * bind, {**aux, "bind": bind}

  train._Examples = Examples  # pylint: disable=protected-access
  train.init_fn, train.loss_fn = init_fn, loss_fn


def bind_accuracy(ctx, s, params):
  """The binding head on the scored test prompts: accuracy of colour, shape and size on the
  occupied cells, and of occupied-or-empty on all 9."""
  config, bb = ctx.config, ctx.backbone
  ids, mask = bb.encode(ctx.prompts, config)
  with s.trainer.ctx():
    cond = jax.jit(lambda q, p, i, m: train.queries_lib.query_states(
        bb.model, p, q, i, m, grid=bb.grid))(params["queries"], bb.params, ids, mask)
  logits = np.asarray(cond[:, :9], np.float32) @ np.asarray(params["bind"]["w"]) + np.asarray(
      params["bind"]["b"])
  labels = cell_labels(ctx.objects)
  bounds = np.cumsum((0,) + BIND_CLASSES)
  pred = np.stack([logits[..., a:b].argmax(-1) for a, b in zip(bounds[:-1], bounds[1:])], -1)
  occupied = labels[..., 0] > 0
  out = {f"bind_{k}": round(float((pred[..., j] == labels[..., j])[occupied].mean()), 3)
         for j, k in enumerate(("colour", "shape", "size"))}
  out["bind_occupied"] = round(float(((pred[..., 0] > 0) == occupied).mean()), 3)
  return out


def main(argv):
  out, design, src, *rest = argv
  kinds = [r.split("=", 1)[1] if "=" in r else "cells" for r in rest
           if r == "--oracle" or r.startswith("--oracle=")]
  if any(k not in ORACLES for k in kinds):
    raise ValueError(f"--oracle={kinds}: expected one of {sorted(ORACLES)}")
  oracle = kinds[-1] if kinds else None
  unfrozen = "--train_backbone" in rest
  binds = [float(r.split("=", 1)[1]) for r in rest if r.startswith("--bind_loss=")]
  unknown = [r for r in rest if r.startswith("--") and not r.startswith(
      ("--oracle=", "--bind_loss=")) and r not in ("--oracle", "--train_backbone")]
  if unknown:
    raise ValueError(f"flags {unknown}: expected --oracle[=cells|words], --train_backbone, "
                     "--bind_loss=W")
  if oracle and (unfrozen or binds):
    raise ValueError("--oracle with --train_backbone or --bind_loss: the oracle bypasses the LM")
  overrides = [r for r in rest if not r.startswith("--")]
  linked_workdir(out, src)
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  config.dit.progress = False
  for item in overrides:
    _override(config, item)
  ctx = stage._Context(config, out)  # pylint: disable=protected-access
  if oracle:
    use_oracle(ctx, oracle)
  if unfrozen:
    train_backbone(ctx)
  if binds:
    bind_loss(ctx, binds[-1])
  dec, dec_params = decoder_lib.restore(config, out, ctx.mesh)
  t = time.time()
  res, _ = stage._design(ctx, design, dec, dec_params)  # pylint: disable=protected-access
  sc = res["scores"]["all"]
  extra = {}
  if binds:
    s = train.load_setup(config, out, design, backbone=ctx.backbone, mesh=ctx.mesh)
    extra = bind_accuracy(ctx, s, train.restore(s)["params"])
  print(json.dumps({"out": out, "design": design, "oracle": oracle,
                    "train_backbone": unfrozen, "bind_loss": binds[-1] if binds else 0,
                    "overrides": overrides,
                    "s": round(time.time() - t), "overall": round(sc["overall"], 3),
                    "se": round(sc["overall_se"], 3),
                    "wrong_prompt": round(res["wrong_prompt"]["overall"], 3),
                    "wrong_prompt_se": round(res["wrong_prompt"]["overall_se"], 3),
                    **{k: round(sc[k], 3) for k in generation.CRITERIA},
                    "fid_clip": round(res["fid_clip"], 1), **extra}))


if __name__ == "__main__":
  main(sys.argv[1:])
