"""Image corruptions of V2L's deblur / shift / rotation tasks, applied BEFORE tokenising.

  blurred = gaussian_blur(images, sigma=1.5)          # uint8 [B, R, R, 3] or [R, R, 3]
  shifted = shift(images, 8, 8, fill="edge")
  rotated = rotate(images, 10.0)

The public code uses albumentations: GaussianBlur with an odd kernel of 5-11 px (sigma 1.1-2.0
at 128 px), a "shift" that is a bottom-right crop after the short-side resize (a no-op for
square inputs) and a 90-degree `np.rot90`. We use fixed, documented corruptions instead, so that
every image gets the same one and square images are really shifted:
- `gaussian_blur`: separable Gaussian, kernel radius ceil(3 sigma), reflected borders.
- `shift`: moves content by (dy, dx) pixels (down/right positive); "wrap" rolls it around,
  "edge" repeats the border row/column into the vacated strip.
- `rotate`: a small rotation (degrees, counter-clockwise) about the centre, bilinear, corners
  filled with the median border colour (PIL).
All take and return uint8 images (rounded), pure numpy/PIL.
"""

import numpy as np
from PIL import Image

FILLS = ("wrap", "edge")


def _images(images):
  x = np.asarray(images)
  if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.shape[-1] != 3:
    raise ValueError(f"images {x.dtype} {x.shape}: expected uint8 [H, W, 3] or [B, H, W, 3]")
  return x


def gaussian_blur(images, sigma: float = 1.5) -> np.ndarray:
  """Separable Gaussian blur with reflected borders; uint8 in, uint8 out, same shape."""
  x = _images(images)
  if not sigma > 0:
    raise ValueError(f"sigma={sigma}: expected > 0")
  r = int(np.ceil(3 * sigma))
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  k /= k.sum()
  y = x.astype(np.float64)
  for axis in (-3, -2):  # H, then W
    if r >= y.shape[axis]:
      raise ValueError(f"sigma={sigma}: kernel radius {r} exceeds the image size {x.shape}")
    pad = [(0, 0)] * y.ndim
    pad[axis] = (r, r)
    p = np.pad(y, pad, mode="reflect")
    n = y.shape[axis]
    y = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
  return np.clip(np.round(y), 0, 255).astype(np.uint8)


def shift(images, dy: int, dx: int, fill: str = "edge") -> np.ndarray:
  """Content moved down by `dy` and right by `dx` pixels (negative: up/left)."""
  x = _images(images)
  if fill not in FILLS:
    raise ValueError(f"fill={fill!r}: expected one of {FILLS}")
  h, w = x.shape[-3:-1]
  if abs(dy) >= h or abs(dx) >= w:
    raise ValueError(f"dy={dy}, dx={dx}: expected |dy| < {h} and |dx| < {w}")
  if fill == "wrap":
    return np.roll(x, (dy, dx), axis=(-3, -2))
  rows = np.clip(np.arange(h) - dy, 0, h - 1)
  cols = np.clip(np.arange(w) - dx, 0, w - 1)
  return np.take(np.take(x, rows, axis=-3), cols, axis=-2)


def rotate(images, degrees: float = 10.0) -> np.ndarray:
  """Counter-clockwise rotation about the centre (bilinear, same size)."""
  x = _images(images)
  if not -180.0 <= degrees <= 180.0:
    raise ValueError(f"degrees={degrees}: expected a value in [-180, 180]")
  flat = x.reshape((-1,) + x.shape[-3:])
  out = []
  for im in flat:
    border = np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    out.append(np.asarray(Image.fromarray(im).rotate(degrees, resample=Image.BILINEAR,
                                                     fillcolor=fill)))
  return np.stack(out).reshape(x.shape)
