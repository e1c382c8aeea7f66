"""Scores for text-to-image generation on shapes prompts: GenEval-style checks, diversity, FID.

  s = geneval(images, scenes)         # {"object", "colour", "count", "position", "overall", ...}
  c = wrong_prompt_control(images, scenes)  # images [P, S, ...]: the same, the next prompt's scene
  d = diversity(features)             # features [P, S, ...]: S samples of each of P prompts
  f = frechet_distance(gen, real)     # [N, D], [M, D]: an FID in any feature space

GenEval (Ghosh et al. 2023) asks an object detector whether each prompt's objects, colours,
counts and positions are in the image. Here the detector is the rule-based scene checker
(`eval/scene_checker.py`), exact on rendered scenes. Per image: `object` = the share of the
prompt's objects whose shape is found (matched as `scene_checker.compare` matches objects),
`colour` and `position` = the share found with that colour / in that cell, `count` = the number
of objects found equals the prompt's; `overall` = the mean of those four (GenEval's overall is
the mean of its task scores) and `exact` = every object right, size included. Each is averaged
over images and given with its standard error.
"""

import numpy as np

from vlbpe_jax.eval import scene_checker

CRITERIA = ("object", "colour", "count", "position")
_FROM_CHECKER = {"object": "shape", "colour": "color", "count": "count", "position": "position"}


def _mean_se(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  if x.size == 0:
    return float("nan"), float("nan")
  se = float(np.std(x, ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")
  return float(np.mean(x)), se


def image_scores(image, objects) -> dict:
  """One image against its prompt's scene: CRITERIA, `overall`, `exact` and `found`."""
  s = scene_checker.score(image, objects)
  out = {k: float(s[v]) for k, v in _FROM_CHECKER.items()}
  out["overall"] = float(np.mean([out[k] for k in CRITERIA]))
  out["exact"] = float(s["all_correct"])
  out["found"] = s["found"]
  return out


def geneval(images, scenes) -> dict:
  """images: uint8 [N, R, R, 3]; scenes: N object lists (one prompt's scene per image).

  Returns `{k: mean, k + "_se": standard error}` for CRITERIA + overall + exact, and `n`.
  """
  images = np.asarray(images)
  if images.ndim != 4 or len(images) != len(scenes):
    raise ValueError(f"images of shape {images.shape} and {len(scenes)} scenes: expected "
                     "uint8 [N, R, R, 3] with one scene per image")
  rows = [image_scores(im, sc) for im, sc in zip(images, scenes)]
  return summarise(rows)


def summarise(rows) -> dict:
  """Means and standard errors of `image_scores` rows."""
  out = {"n": len(rows)}
  for k in CRITERIA + ("overall", "exact"):
    out[k], out[k + "_se"] = _mean_se([r[k] for r in rows])
  return out


def wrong_prompt_control(images, scenes) -> dict | None:
  """The control a text-to-image model must beat: each prompt's images scored against the next
  prompt's scene (prompt i's images judged as if prompt (i + 1) mod P had asked for them).

  images: uint8 [P, S, R, R, 3], S images of each of P prompts; scenes: P object lists. A
  model that ignores its prompts scores the same here as against their own scenes (exactly,
  with one image for all); real renders score 1 there and their scenes' overlap here. Returns
  `summarise` of the P * S rows, or None for a single prompt (no other prompt to ask).
  """
  images = np.asarray(images)
  if images.ndim != 5 or len(images) != len(scenes):
    raise ValueError(f"images of shape {images.shape} and {len(scenes)} scenes: expected "
                     "uint8 [P, S, R, R, 3] with one scene per prompt")
  if len(scenes) < 2:
    return None
  nxt = list(scenes[1:]) + [scenes[0]]
  return summarise([image_scores(im, sc) for ims, sc in zip(images, nxt) for im in ims])


def diversity(features) -> float:
  """Mean pairwise L2 distance between the S samples of each prompt, averaged over prompts.

  features: [P, S, ...] float (S >= 2). 0 when every prompt gives one image (the seed's
  prediction for CLIP + MSE, which is deterministic given the prompt).
  """
  f = np.asarray(features, np.float64)
  if f.ndim < 3 or f.shape[1] < 2:
    raise ValueError(f"features of shape {f.shape}: expected [prompts, samples >= 2, ...]")
  f = f.reshape(f.shape[0], f.shape[1], -1)  # [P, S, F]
  d = np.sqrt(np.maximum(np.sum((f[:, :, None] - f[:, None, :]) ** 2, axis=-1), 0.0))
  s = f.shape[1]
  return float(np.mean(d.sum(axis=(1, 2)) / (s * (s - 1))))


def _sqrtm_psd(a):
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(x, y) -> float:
  """Fréchet distance between Gaussians fitted to x [N, D] and y [M, D] (FID's formula).

  ||mu_x - mu_y||^2 + tr(Sx + Sy - 2 (Sx^1/2 Sy Sx^1/2)^1/2), computed with symmetric
  eigendecompositions (exact for PSD covariances, no complex parts to drop).
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
    raise ValueError(f"features of shapes {x.shape} and {y.shape}: expected [N, D] and [M, D] "
                     "with N, M >= 2")
  mx, my = x.mean(0), y.mean(0)
  sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  r = _sqrtm_psd(sx)
  cross = _sqrtm_psd(r @ sy @ r)
  return float(np.sum((mx - my) ** 2) + np.trace(sx) + np.trace(sy) - 2.0 * np.trace(cross))
