"""Does a CLIP run learn shape? Zero-shot and centroid-probe accuracy on fresh single-object scenes.

  PYTHONPATH=.:tests .venv/bin/python benchmarks/clip_shape.py NAME [config.key=value ...]
  e.g. ... clip_shape.py twinstem_2k 'clip.twin_images=("shape",)' \
           'clip.model.conv_stem=(16, 32, 64)' clip.total_steps=2000 clip.lr=2e-3 clip.batch_size=32

Trains the demo config's CLIP (configs/tiny.py with the overrides; `clip.model.*` go to
clip/config.py's CLIPConfig) under `/tmp/clipshape/NAME` on the demo's data (the data stage runs
there first when absent), then scores:
- zero-shot shape and colour (clip/zero_shot.py) on 600 (FRESH) single-object scenes never trained
  on: the first single-object examples of `shapes.make_example(i, "train", seed=7)`;
- shape given the rest: the same fresh scenes against six captions that differ only in the
  shape, the colour, size and position being the scene's own (first template; chance 1/6):
  whether the embedding holds shape at all, where zero-shot asks for it apart from the rest;
- zero-shot by the best caption (clip/zero_shot.best_caption_accuracy): the shape and colour of
  the best-matching one among all single-object captions, where `zero_shot_accuracy` averages
  each class's captions into one embedding;
- a nearest-centroid probe of the unit image embeddings (class centroids from as many
  single-object scenes of seed 8): what the image tower alone separates, text aside;
- the stage's own metric: zero-shot on the test split's single-object scenes (45 in the demo),
  and the same on the train split's (the images it was trained on: memorised or learned?);
- twin matching: each scene beside its shape twin (clip/train.twin_scenes), the two images
  against the two captions (first template): the share of images closer to their own caption,
  on the first 600 train scenes (the twins `clip.twin_images` trains on) and on 600 fresh
  scenes of seed 7 (chance 50%);
- what it buys BLIP3-o's generator: the pipeline's pixel decoder (dit/decoder.py, the config's
  `dit.decoder`) trained on this CLIP's grid features, and the scene checker's GenEval-style
  scores of decoder(CLIP(real test image)) -- the stage's ceiling -- on its first
  `dit.num_eval` test images (64) and on the whole test split.
Appends one JSON line to benchmarks/clip_shape.jsonl. BENCHMARKS.md, "Why CLIP + FM fails
here", has the figures.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from dit_sweep import _override  # the sweep scripts' one `key=value` override parser
from test_main import ROOT, load_config
from vlbpe_jax import loop
from vlbpe_jax.clip import loss as clip_loss_lib
from vlbpe_jax.clip import train
from vlbpe_jax.clip import zero_shot
from vlbpe_jax.data import shapes
from vlbpe_jax.data import stage as data_stage
from vlbpe_jax.dit import decoder as decoder_lib
from vlbpe_jax.eval import generation

FRESH = 600


def single_object_scenes(seed: int, num: int, resolution: int):
  """The first `num` single-object examples of split "train" under `seed`: (images, objects)."""
  images, objects, i = [], [], 0
  while len(images) < num:
    ex = shapes.make_example(i, "train", seed=seed, resolution=resolution)
    if len(ex["objects"]) == 1:
      images.append(ex["image"])
      objects.append(ex["objects"])
    i += 1
  return np.stack(images), objects


def centroid_probe(emb_fit, labels_fit, emb_eval, labels_eval, num_classes: int) -> float:
  """Accuracy of nearest class centroid (cosine) of unit embeddings."""
  fit = np.asarray(clip_loss_lib.normalize(emb_fit))
  cents = np.stack([fit[labels_fit == k].mean(0) for k in range(num_classes)])
  cents /= np.linalg.norm(cents, axis=-1, keepdims=True)
  pred = np.argmax(np.asarray(clip_loss_lib.normalize(emb_eval)) @ cents.T, axis=-1)
  return float(np.mean(pred == labels_eval))


def _unit_images(model, params, mesh, images):
  return np.asarray(clip_loss_lib.normalize(train.image_embeddings(model, params, images, mesh)))


def _unit_texts(model, params, ids):
  """ids [N, K, T] -> unit text embeddings [N, K, E]."""
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_text"))
  return np.stack([np.asarray(clip_loss_lib.normalize(fn(params, ids[:, k])))
                   for k in range(ids.shape[1])], axis=1)


def shape_given_rest(model, params, mesh, images, objects, tok, context_len: int) -> float:
  """6-way: each single-object image against its caption with every shape in turn."""
  caps = train.caption_ids(
      tok, [[shapes.captions([{**o[0], "shape": s}])[0] for s in shapes.SHAPES]
            for o in objects], context_len)  # [N, 6, T]
  img, txt = _unit_images(model, params, mesh, images), _unit_texts(model, params, caps)
  truth = np.asarray([shapes.SHAPES.index(o[0]["shape"]) for o in objects])
  return float(np.mean(np.argmax(np.einsum("NE,NKE->NK", img, txt), -1) == truth))


def twin_matching(model, params, mesh, images, objects, tok, context_len: int) -> float:
  """Share of (scene, shape twin) images closer (cosine) to their own caption than the other's."""
  twin_images, twin_objects = train.twin_scenes(images, objects, ("shape",), seed=0)
  caps = train.caption_ids(tok, [[shapes.captions(o)[0], shapes.captions(t)[0]]
                                 for o, t in zip(objects, twin_objects)], context_len)
  img = np.stack([_unit_images(model, params, mesh, x) for x in (images, twin_images)], 1)
  sims = np.einsum("NIE,NKE->NIK", img, _unit_texts(model, params, caps))  # [N, 2, 2]
  # The scene's image to its own caption (k = 0), the twin's image to the twin's (k = 1).
  right = np.concatenate([sims[:, 0, 0] > sims[:, 0, 1], sims[:, 1, 1] > sims[:, 1, 0]])
  return float(np.mean(right))


def main(name, overrides):
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  config.clip.progress = config.dit.progress = False
  for item in overrides:
    _override(config, item)
  workdir = f"/tmp/clipshape/{name}"
  if not os.path.exists(data_stage.tokenizer_path(workdir)):
    data_stage.run_stage(config, workdir)
  model, trainer, state = train.train(config, workdir)  # resumes, or returns the finished run
  train_s = loop.train_seconds(os.path.join(train.run_dir(workdir), "ckpt"))
  params = state["params"]
  encode = train.encode_fn(data_stage.load_tokenizer(workdir))
  res = int(config.data.resolution)
  images, objects = single_object_scenes(7, FRESH, res)
  fit_images, fit_objects = single_object_scenes(8, FRESH, res)
  out = {"name": name, "overrides": overrides, "train_s": round(train_s, 1),
         "zero_shot_fresh": zero_shot.zero_shot_accuracy(model, params, images, objects, encode)}
  emb = train.image_embeddings(model, params, images, trainer.mesh)
  emb_fit = train.image_embeddings(model, params, fit_images, trainer.mesh)
  out["centroid_fresh"] = {}
  for attribute, classes in zero_shot.ATTRIBUTES.items():
    label = lambda objs: np.asarray([classes.index(o[0][attribute]) for o in objs])  # noqa: E731
    out["centroid_fresh"][attribute] = centroid_probe(emb_fit, label(fit_objects), emb,
                                                      label(objects), len(classes))
  out["test_split"] = train.evaluate(config, workdir, model, params)
  tok, ctx_len = data_stage.load_tokenizer(workdir), model.config.context_len
  fresh_all = [shapes.make_example(i, "train", seed=7, resolution=res) for i in range(FRESH)]
  train600 = data_stage.load_scenes(config, workdir, "train", FRESH)
  out["shape_given_rest_fresh"] = shape_given_rest(model, params, trainer.mesh, images, objects,
                                                   tok, ctx_len)
  out["best_caption_fresh"] = zero_shot.best_caption_accuracy(model, params, images, objects,
                                                              encode)
  out["twin_matching"] = {
      "train": twin_matching(model, params, trainer.mesh, train600["images"],
                             train600["objects"], tok, ctx_len),
      "fresh": twin_matching(model, params, trainer.mesh,
                             np.stack([e["image"] for e in fresh_all]),
                             [e["objects"] for e in fresh_all], tok, ctx_len)}
  test = data_stage.load_scenes(config, workdir, "test")
  train_split = data_stage.load_scenes(config, workdir, "train")
  train_images = train_split["images"]
  one = [i for i, o in enumerate(train_split["objects"]) if len(o) == 1]
  out["train_split"] = dict(zero_shot.zero_shot_accuracy(
      model, params, train_images[one], [train_split["objects"][i] for i in one], encode),
                            n=len(one))

  def grid(x):
    return train.grid_features(model, params, x, trainer.mesh, int(config.clip.grid))

  dec, dec_state = decoder_lib.train_decoder(config, workdir, grid(train_images), train_images)
  out["decoder_s"] = round(loop.train_seconds(os.path.join(dec.run_dir, "ckpt")), 1)
  recon = decoder_lib.decode(dec, dec_state["params"], grid(test["images"]))
  n = min(int(config.dit.num_eval), len(recon))
  for field, k in (("ceiling_stage", n), ("ceiling_test", len(recon))):
    g = generation.geneval(recon[:k], test["objects"][:k])
    out[field] = {m: round(g[m], 3)
                  for m in generation.CRITERIA + ("overall", "overall_se", "n")}
  out["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True, check=False).stdout.strip()
  out["machine"] = f"{os.cpu_count()} cores, {jax.devices()[0].platform}"
  print(json.dumps(out))
  with open(os.path.join(ROOT, "benchmarks", "clip_shape.jsonl"), "a") as f:
    f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
  if len(sys.argv) < 2:
    raise SystemExit(__doc__)
  jax.config.update("jax_threefry_partitionable", True)
  main(sys.argv[1], sys.argv[2:])
