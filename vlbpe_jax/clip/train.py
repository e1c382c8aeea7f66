"""Trains the small CLIP on the shapes data: InfoNCE over (image, one of its captions) pairs,
optionally with hard-negative captions (`clip.hard_negatives`: NegCLIP's swapped-attribute
captions, here the same caption with one object's shape or colour changed) and hard-negative
images (`clip.twin_images`: each scene comes with its twin, the same scene with one object's
shape or colour changed, rendered, as a second pair of the batch: the only way in-batch
contrast can tell the two apart is the changed attribute, so the image tower must encode it).

  python -m vlbpe_jax.clip.train --config=configs/tiny.py --workdir=$W

Needs the `data` stage's files in `$W` (tfds shapes, text tokenizer). Writes `$W/clip/ckpt`
(orbax: state + grain iterator + config) and `$W/clip/metrics.jsonl` (+ tfevents); resumes
from the latest checkpoint. Its image tower's patch features, average-pooled to a
`clip.grid` x `clip.grid` token grid, are what the DiT learns to generate (BLIP3-o's EVA-CLIP
target, `features.pool_grid`). Reads `config.clip.*`, `config.seed`, `config.mesh`.
"""

import functools
import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from vlbpe_jax import checkpoint
from vlbpe_jax import cli
from vlbpe_jax import loop
from vlbpe_jax import parallel
from vlbpe_jax import sharded_trainer
from vlbpe_jax.clip import features
from vlbpe_jax.clip import loss as loss_lib
from vlbpe_jax.clip import model as model_lib
from vlbpe_jax.clip import text as text_lib
from vlbpe_jax.clip import zero_shot
from vlbpe_jax.data import pipeline
from vlbpe_jax.data import shapes
from vlbpe_jax.data import stage as data_stage

# Config keys a checkpoint must agree on before it is restored.
MUST_MATCH = ("seed", "data", "clip.variant", "clip.model", "clip.batch_size",
              "clip.total_steps", "clip.lr", "clip.hard_negatives", "clip.twin_images")
ATTRIBUTES = tuple(zero_shot.ATTRIBUTES)  # ("shape", "color"): what negatives and twins swap


def check_config(config):
  c = config.clip
  for name in ("batch_size", "total_steps", "log_every", "ckpt_every", "grid"):
    if int(c[name]) < 1:
      raise ValueError(f"clip.{name}={c[name]!r}: expected a positive int")
  if not float(c.lr) > 0:
    raise ValueError(f"clip.lr={c.lr!r}: expected > 0")
  for name in ("hard_negatives", "twin_images"):
    attrs = tuple(c.get(name, ()))
    if any(a not in ATTRIBUTES for a in attrs) or len(set(attrs)) != len(attrs):
      raise ValueError(f"clip.{name}={attrs!r}: expected distinct attributes among "
                       f"{ATTRIBUTES}, or () for none")
  if tuple(c.get("hard_negatives", ())) and tuple(c.get("twin_images", ())):
    raise ValueError(f"clip.twin_images={tuple(c.twin_images)!r} with clip.hard_negatives="
                     f"{tuple(c.hard_negatives)!r}: expected one of the two, not both")


def make_model(config, tok) -> model_lib.CLIP:
  c = config.clip
  return model_lib.CLIP(model_lib.config_for(
      c.variant, image_size=config.data.resolution, vocab_size=tok.vocab_size,
      **dict(c.model)))


def encode_fn(tok):
  """The text tower's encoder: sentencepiece pieces + EOS (never the pad id 0)."""
  return lambda s: tok.encode(s, add_eos=True)


def to_float(images):
  """uint8 [..., 3] -> float32 in [-1, 1]."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


class _Pairs:
  """`(index, rng) -> {"images", "ids"[, "neg_ids"]}`: the image and one of its captions, drawn
  per epoch, with that caption's hard negative when `neg_ids` is given. With `twins` (images
  `[N, R, R, 3]` and ids `[N, K, T]` of each scene's twin), "images" is `[2, R, R, 3]` and "ids"
  `[2, T]`: the pair, then its twin's pair with the same caption template."""

  def __init__(self, images, ids, neg_ids=None, twins=None):
    self.images, self.ids = images, ids  # [N, R, R, 3] uint8, [N, K, T] int32
    self.neg_ids = neg_ids  # None or [N, K, T] int32
    self.twins = twins  # None or (images, ids)

  def __call__(self, index, rng):
    i = int(index)
    k = int(rng.integers(self.ids.shape[1]))
    out = {"images": to_float(self.images[i]), "ids": self.ids[i, k]}
    if self.neg_ids is not None:
      out["neg_ids"] = self.neg_ids[i, k]
    if self.twins is not None:
      out["images"] = np.stack([out["images"], to_float(self.twins[0][i])])
      out["ids"] = np.stack([out["ids"], self.twins[1][i, k]])
    return out


def caption_ids(tok, captions, context_len):
  """Lists of captions (the same count for every example) -> int32 [N, K, T]."""
  k = len(captions[0])
  if any(len(c) != k for c in captions):
    raise ValueError(f"examples hold different numbers of captions; expected {k} each")
  flat = text_lib.tokenize([t for c in captions for t in c], encode_fn(tok), context_len)
  return flat.reshape(len(captions), k, context_len)


def hard_negative_captions(objects, attributes, seed: int) -> list[list[str]]:
  """For each scene (`objects`: N object lists of the train split) and each caption template,
  the caption of the scene with one object's shape or colour (drawn from `attributes`) changed
  (`shapes.swap_attribute`): `[N][K]` strings, aligned with `shapes.captions`, so that a pair's
  negative differs from its caption in that one word. Fixed per (seed, scene, template)."""
  out = []
  for i, objs in enumerate(objects):
    row = []
    for k in range(len(shapes.captions(objs))):
      rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i, k])
      attribute = attributes[int(rng.integers(len(attributes)))]
      row.append(shapes.captions(shapes.swap_attribute(objs, attribute, "train", rng))[k])
    out.append(row)
  return out


def twin_scenes(images, objects, attributes, seed: int):
  """For each train scene (`images` uint8 `[N, R, R, 3]` as rendered from `objects`), its twin:
  the scene with one object's shape or colour (drawn from `attributes`) changed
  (`shapes.swap_attribute`, never into a held-out pair), drawn on the same background. Returns
  `(images [N, R, R, 3] uint8, objects)`, fixed per (seed, scene). Raises when a stored image
  is not the renderer's picture of its objects (then a twin would differ in more than one
  attribute)."""
  images = np.asarray(images)
  r = images.shape[1]
  tones = {tuple(v): k for k, v in shapes.BACKGROUNDS.items()}
  out_images, out_objects = np.empty_like(images), []
  for i, objs in enumerate(objects):
    background = tones.get(tuple(int(v) for v in images[i, 0, 0]))
    if background is None or not np.array_equal(
        shapes.render(objs, r, background=background), images[i]):
      raise ValueError(f"train image {i} is not shapes.render of its objects {objs}; "
                       "expected the data stage's own renders to draw twin images")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i, 1])
    attribute = attributes[int(rng.integers(len(attributes)))]
    twin = shapes.swap_attribute(objs, attribute, "train", rng)
    out_images[i] = shapes.render(twin, r, background=background)
    out_objects.append(twin)
  return out_images, out_objects


def loss_fn(params, batch, key, frozen, *, model):
  del key, frozen
  if batch["images"].ndim == 5:  # twins: [B, 2, ...] -> [2B, ...], each pair then its twin
    batch = {**batch, "images": batch["images"].reshape((-1,) + batch["images"].shape[2:]),
             "ids": batch["ids"].reshape((-1,) + batch["ids"].shape[2:])}
  ids, neg = batch["ids"], batch.get("neg_ids")
  if neg is not None:  # one text-tower pass over captions and negatives
    ids = jnp.concatenate([ids, neg])
  img, txt, scale = model.apply({"params": params}, batch["images"], ids)
  if neg is None:
    return loss_lib.clip_loss(img, txt, scale)
  b = batch["ids"].shape[0]
  return loss_lib.clip_loss(img, txt[:b], scale, neg_emb=txt[b:])


def make_mesh(config):
  """The clip stage's mesh: fitted to `clip.batch_size` (vlbpe_jax/parallel.py:plan_mesh)."""
  return parallel.mesh_from_config(config.mesh, batch_size=config.clip.batch_size)


def make_trainer(config, model, mesh) -> sharded_trainer.Trainer:
  c = config.clip
  r = config.data.resolution
  init = lambda key: model.init(key, jnp.zeros((1, r, r, 3)),  # noqa: E731
                                jnp.ones((1, model.config.context_len), jnp.int32))["params"]
  tx = sharded_trainer.adamw_cosine(
      lr=float(c.lr), total_steps=int(c.total_steps), warmup_steps=int(c.warmup_steps),
      final_lr=float(c.lr) * float(c.final_lr_frac), grad_clip=float(c.grad_clip),
      weight_decay=float(c.weight_decay))
  return sharded_trainer.Trainer(init, functools.partial(loss_fn, model=model), tx, mesh)


def run_dir(workdir):
  return os.path.join(workdir, "clip")


def train(config, workdir: str, *, stop_at_step=None):
  """Trains (or resumes) to `clip.total_steps`; returns `(model, trainer, state)`."""
  check_config(config)
  c = config.clip
  tok = data_stage.load_tokenizer(workdir)
  model = make_model(config, tok)
  trainer = make_trainer(config, model, make_mesh(config))
  data = data_stage.load_scenes(config, workdir, "train")
  ids = caption_ids(tok, data["captions"], model.config.context_len)
  neg_ids = None
  if tuple(c.get("hard_negatives", ())):
    negs = hard_negative_captions(data["objects"], tuple(c.hard_negatives), config.seed)
    neg_ids = caption_ids(tok, negs, model.config.context_len)
  twins = None
  if tuple(c.get("twin_images", ())):
    twin_images, twin_objects = twin_scenes(data["images"], data["objects"],
                                            tuple(c.twin_images), config.seed)
    twins = (twin_images, caption_ids(tok, [shapes.captions(o) for o in twin_objects],
                                      model.config.context_len))
  it = pipeline.sharded_iterator(
      functools.partial(pipeline.dataset, np.arange(len(ids)),
                        _Pairs(data["images"], ids, neg_ids, twins), seed=config.seed),
      batch_size=int(c.batch_size), data_shards=int(c.get("data_shards", 0)), section="clip")
  key_init, key_train = parallel.replicate(tuple(jax.random.split(jax.random.key(config.seed))),
                                           trainer.mesh)
  state = loop.run(run_dir(workdir), trainer.abstract_state, lambda: trainer.init(key_init),
                   lambda s, b: trainer.step(s, b, key_train), it, config=config,
                   must_match=MUST_MATCH, total_steps=int(c.total_steps),
                   log_every=int(c.log_every), ckpt_every=int(c.ckpt_every), name="clip",
                   progress=bool(c.progress),
                   items_per_step={"perf/pairs_per_s": int(c.batch_size)},
                   stop_at_step=stop_at_step)
  return model, trainer, state


def restore(config, workdir: str, mesh=None):
  """The trained CLIP: `(model, params, trainer)` from `$W/clip/ckpt` (ValueError when absent),
  on `mesh` (a later stage's; default: the clip stage's own)."""
  tok = data_stage.load_tokenizer(workdir)
  model = make_model(config, tok)
  trainer = make_trainer(config, model, make_mesh(config) if mesh is None else mesh)
  path = os.path.join(run_dir(workdir), "ckpt")
  state = checkpoint.restore_latest(path, trainer.abstract_state, what="CLIP",
                                    hint="run the 'clip' stage first", config=config,
                                    must_match=MUST_MATCH)
  return model, state["params"], trainer


@functools.lru_cache(maxsize=None)
def _jitted(model, method):
  """One jitted `(params, images) -> model.method(images)` per (model, method): the dit stage
  calls these many times, and a fresh `jax.jit` of a new lambda would compile each time."""
  return jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))


def _apply(model, params, images, mesh, method, batch_size=64):
  fn = _jitted(model, method)

  def run(chunk):
    with jax.set_mesh(mesh):
      return jax.device_get(fn(params, parallel.shard_batch(to_float(chunk), mesh)))
  return parallel.map_batches(run, np.asarray(images), batch_size, parallel.batch_shards(mesh))


def image_embeddings(model, params, images, mesh):
  """uint8 [N, R, R, 3] -> float32 [N, E] (not normalised)."""
  return _apply(model, params, images, mesh, model_lib.CLIP.encode_image)


def grid_features(model, params, images, mesh, grid: int):
  """uint8 [N, R, R, 3] -> float32 [N, grid, grid, D]: patch features pooled to the grid."""
  feats = _apply(model, params, images, mesh, model_lib.CLIP.patch_features)
  return np.asarray(features.pool_grid(jnp.asarray(feats), grid))


def evaluate(config, workdir, model, params) -> dict:
  """Zero-shot shape and colour accuracy on the test split's single-object scenes: by the mean
  of each class's prompts (`shape_acc`, `color_acc`) and by the best-matching caption
  (`best_caption_shape_acc`, `best_caption_color_acc`; zero_shot.py says when they differ)."""
  tok = data_stage.load_tokenizer(workdir)
  test = data_stage.load_scenes(config, workdir, "test")
  one = [i for i, o in enumerate(test["objects"]) if len(o) == 1]
  if not one:
    raise ValueError("the test split holds no single-object scene for zero-shot accuracy")
  images, objects = test["images"][one], [test["objects"][i] for i in one]
  acc = zero_shot.zero_shot_accuracy(model, params, images, objects, encode_fn(tok))
  best = zero_shot.best_caption_accuracy(model, params, images, objects, encode_fn(tok))
  return {"shape_acc": acc["shape"], "color_acc": acc["color"],
          "best_caption_shape_acc": best["shape"], "best_caption_color_acc": best["color"],
          "n": len(one)}


def train_and_evaluate(config, workdir: str) -> dict:
  model, trainer, state = train(config, workdir)
  out = evaluate(config, workdir, model, state["params"])
  out["train_seconds"] = loop.train_seconds(os.path.join(run_dir(workdir), "ckpt"))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  jax.config.update("jax_threefry_partitionable", True)
  print(json.dumps(train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/tiny.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Pipeline directory (CLIP writes under workdir/clip).")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
