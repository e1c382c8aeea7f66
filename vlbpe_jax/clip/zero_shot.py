"""Zero-shot shape and colour classification with prompts that read like the training captions.

A class embedding is the mean of the L2-normalised text embeddings of its prompts (prompt
ensembling, as in CLIP), renormalised. The prompts are the captions `data/shapes.py` writes for
a single-object scene holding the class, over every size, position and value of the other
attribute ("a small red circle at the top-left.", ...), so they match the training captions.

  acc = zero_shot_accuracy(model, params, images, objects, lambda s: tok.encode(s, add_eos=True))
  acc["shape"], acc["color"]    # fractions of the single-object images classified right

`best_caption_accuracy` reads the classes off the single best-matching caption instead (every
shape, colour, size and position): a CLIP that holds shape only together with the rest of the
scene -- it tells "a red star at the top" from "a red circle at the top", but no one direction
of its embedding means "star" -- names shapes there and at chance under the mean of the
prompts (the twin-image CLIP of BENCHMARKS.md, "Why CLIP + FM fails here").
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vlbpe_jax.clip import loss as clip_loss_lib
from vlbpe_jax.clip import text as clip_text
from vlbpe_jax.data import shapes

ATTRIBUTES = {"shape": shapes.SHAPES, "color": tuple(shapes.COLORS)}


def class_prompts(attribute: str, *, all_templates: bool = False) -> dict[str, list[str]]:
  """Class -> prompts for `attribute` ("shape" | "color"): single-object captions over every
  size, position and other-attribute value; the first caption template, or all four."""
  if attribute not in ATTRIBUTES:
    raise ValueError(f"attribute={attribute!r} unknown; expected one of {sorted(ATTRIBUTES)}")
  other = "color" if attribute == "shape" else "shape"
  out = {}
  for value in ATTRIBUTES[attribute]:
    texts = []
    for o, size, pos in itertools.product(ATTRIBUTES[other], shapes.SIZES, shapes.POSITIONS):
      caps = shapes.captions([{attribute: value, other: o, "size": size, "position": pos}])
      texts.extend(caps if all_templates else caps[:1])
    out[value] = texts
  return out


def class_embeddings(embed_texts, prompts, encode, context_len: int):
  """prompts: class -> texts; embed_texts: ids `[N, T]` -> `[N, E]`. Returns `[K, E]` unit rows
  in the order of `prompts`."""
  rows = []
  for texts in prompts.values():
    emb = clip_loss_lib.normalize(embed_texts(clip_text.tokenize(texts, encode, context_len)))
    rows.append(emb.mean(axis=0))
  return clip_loss_lib.normalize(jnp.stack(rows))  # [K, E]


def classify(img_emb, class_emb):
  """img_emb `[N, E]`, class_emb `[K, E]` -> `[N]` int32: the class of highest cosine."""
  chex.assert_rank([img_emb, class_emb], 2)
  chex.assert_equal_shape_suffix([img_emb, class_emb], 1)
  sims = jnp.einsum("NE,KE->NK", clip_loss_lib.normalize(img_emb),
                    clip_loss_lib.normalize(class_emb))
  return jnp.argmax(sims, axis=-1).astype(jnp.int32)


def _batched(fn, x, batch_size):
  """fn over `x [N, ...]` in fixed-size batches (the last one zero-padded: one compilation)."""
  outs = []
  for start in range(0, len(x), batch_size):
    chunk = x[start:start + batch_size]
    pad = batch_size - len(chunk)
    chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    outs.append(np.asarray(fn(chunk))[:batch_size - pad])
  return np.concatenate(outs)


def _embedders(model, params, images, objects, batch_size):
  """Checks single-object `images`/`objects`; -> (image embeddings [N, E], ids -> [M, E])."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(objects):
    raise ValueError(f"images {images.dtype} {images.shape} with {len(objects)} object lists: "
                     "expected uint8 [N, R, R, 3] and one object list per image")
  if not len(images) or any(len(objs) != 1 for objs in objects):
    raise ValueError(f"objects: expected N >= 1 single-object scenes; got object counts "
                     f"{sorted({len(o) for o in objects})} over {len(objects)} scenes")
  img_fn = jax.jit(lambda p, x: model.apply({"params": p}, x.astype(jnp.float32) / 127.5 - 1.0,
                                            method="encode_image"))
  txt_fn = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method="encode_text"))
  return _batched(lambda x: img_fn(params, x), images, batch_size), lambda ids: txt_fn(params, ids)


def zero_shot_accuracy(model, params, images, objects, encode, *, batch_size: int = 64,
                       all_templates: bool = False) -> dict[str, float]:
  """Shape and colour zero-shot accuracy of CLIP `model` (params unboxed) on single-object scenes.

  images: uint8 `[N, R, R, 3]`; objects: N lists of one object dict each (shapes.make_scene);
  encode: text -> ids ending with the EOS, without id 0 (text.py). Returns {"shape", "color"}.
  """
  img_emb, embed_txt = _embedders(model, params, images, objects, batch_size)
  result = {}
  for attribute, classes in ATTRIBUTES.items():
    prompts = class_prompts(attribute, all_templates=all_templates)
    class_emb = class_embeddings(lambda ids: _batched(embed_txt, ids, batch_size), prompts,
                                 encode, model.config.context_len)
    truth = np.asarray([classes.index(objs[0][attribute]) for objs in objects])
    result[attribute] = float(np.mean(np.asarray(classify(img_emb, class_emb)) == truth))
  return result


def single_object_scenes() -> list[dict]:
  """Every single-object scene description (shape x colour x size x position), in that order."""
  return [{"shape": s, "color": c, "size": z, "position": p}
          for s, c, z, p in itertools.product(shapes.SHAPES, shapes.COLORS, shapes.SIZES,
                                              shapes.POSITIONS)]


def best_caption_accuracy(model, params, images, objects, encode, *,
                          batch_size: int = 64) -> dict[str, float]:
  """Shape and colour accuracy of reading each single-object image's classes off its
  best-matching caption (cosine) among every single-object scene's first caption template.
  Same arguments and checks as `zero_shot_accuracy`; returns {"shape", "color"}."""
  img_emb, embed_txt = _embedders(model, params, images, objects, batch_size)
  scenes = single_object_scenes()
  ids = clip_text.tokenize([shapes.captions([o])[0] for o in scenes], encode,
                           model.config.context_len)
  cap_emb = clip_loss_lib.normalize(_batched(embed_txt, ids, batch_size))  # [S, E]
  best = np.asarray(classify(img_emb, cap_emb))  # the best caption's index, per image
  return {a: float(np.mean([scenes[b][a] == objs[0][a] for b, objs in zip(best, objects)]))
          for a in ATTRIBUTES}
