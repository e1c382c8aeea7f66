"""Pipeline stage `clip`: the contrastive image-text model on the shapes data, with a report.

Trains `clip/train.py` (resuming), then reports zero-shot shape and colour accuracy on the test
split's single-object scenes (chance: 1 / number of shapes or colours). Its image tower's pooled
patch features are the `dit` stage's generation target. Reads `config.clip.*`, `config.seed`,
`config.mesh`, `config.data.*`.
"""

import math

from vlbpe_jax.clip import train
from vlbpe_jax.data import shapes
from vlbpe_jax.eval import report


def run_stage(config, workdir: str) -> dict:
  res = train.train_and_evaluate(config, workdir)
  m = {f"clip.zero_shot_{k}": v for k, v in res.items()
       if k in ("shape_acc", "color_acc", "n")}
  m.update({f"clip.{k}": res[k] for k in ("best_caption_shape_acc", "best_caption_color_acc")})
  m["clip.train_steps"] = int(config.clip.total_steps)
  if math.isfinite(res.get("train_seconds", math.nan)):
    m["clip.train_seconds"] = res["train_seconds"]
  chance = {"shape": 1 / len(shapes.SHAPES), "color": 1 / len(shapes.COLORS)}
  rows = [(k, f"{res[f'{k}_acc']:.1%}", f"{res[f'best_caption_{k}_acc']:.1%}",
           f"{chance[k]:.1%}") for k in ("shape", "color")]
  hard = tuple(config.clip.get("hard_negatives", ()))
  negs = (f" and hard-negative captions (one object's {' or '.join(hard)} changed)"
          if hard else "")
  twins = tuple(config.clip.get("twin_images", ()))
  if twins:
    negs += (f", each scene beside its twin (the scene with one object's {' or '.join(twins)} "
             "changed, rendered)")
  stem = tuple(config.clip.model.get("conv_stem", ()))
  tower = f", convolutional stem {list(stem)}" if stem else ""
  html = (f"<p>CLIP ({config.clip.variant}{tower}), trained {int(config.clip.total_steps)} "
          f"steps with InfoNCE on (image, caption) pairs{negs}. Zero-shot classification of the "
          f"{res['n']} single-object test scenes, by cosine between the image embedding and "
          "one text embedding per class (the mean of its captions over every other "
          "attribute), and by the best-matching caption among all single-object ones (a CLIP "
          "that holds shape only together with colour, size and position reads it there "
          "alone):</p>"
          + report.table(("attribute", "zero-shot accuracy", "best caption", "chance"), rows))
  report.add_section(workdir, key="clip", title="CLIP (generation target)", order=50,
                     html=html, metrics=m)
  return m
