"""Small report plots drawn with PIL (no matplotlib): a scatter, a histogram and a line panel.

  img = np.concatenate([scatter([("text", BLUE, xy_t), ("visual", ORANGE, xy_v)]),
                        histogram(edges, [("text", BLUE, share_t), ("visual", ORANGE, share_v)])],
                       axis=1)                                    # uint8 [H, W, 3]
  report.save_image(workdir, "lm/plot.png", img)

A group is `(label, rgb, values)` (`PALETTE` has more colours); every panel has an axes box, the
end values of both axes and a legend with the group labels.
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)
PALETTE = (BLUE, ORANGE, (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127))  # matplotlib's tab10, first eight
SIZE = (360, 300)  # W, H of a panel
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 12, 26, 34  # margins around the axes box


def _panel(title, xlabel, xlim, ylim, ytext=None):
  """A white panel with its axes box, end ticks and labels; returns (image, draw, to_px).

  ytext: the labels of the y axis' ends (default: `ylim` itself)."""
  w, h = SIZE
  img = Image.new("RGB", SIZE, "white")
  draw = ImageDraw.Draw(img)
  font = ImageFont.load_default()
  x0, y0, x1, y1 = _LEFT, _TOP, w - _RIGHT, h - _BOTTOM
  draw.rectangle([x0, y0, x1, y1], outline="black")
  draw.text((x0, 4), title, fill="black", font=font)
  draw.text((x0, y1 + 4), f"{xlim[0]:.3g}", fill="black", font=font)
  draw.text((x1, y1 + 4), f"{xlim[1]:.3g}", fill="black", font=font, anchor="ra")
  draw.text(((x0 + x1) // 2, y1 + 18), xlabel, fill="black", font=font, anchor="ma")
  ytext = ytext or tuple(f"{v:.3g}" for v in ylim)
  draw.text((x0 - 4, y1), ytext[0], fill="black", font=font, anchor="rs")
  draw.text((x0 - 4, y0), ytext[1], fill="black", font=font, anchor="ra")

  def to_px(x, y):
    fx = (np.asarray(x) - xlim[0]) / max(xlim[1] - xlim[0], 1e-12)
    fy = (np.asarray(y) - ylim[0]) / max(ylim[1] - ylim[0], 1e-12)
    return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

  return img, draw, to_px


def _legend(draw, groups):
  font = ImageFont.load_default()
  x, y = SIZE[0] - _RIGHT - 154, _TOP + 4
  draw.rectangle([x - 4, y - 2, SIZE[0] - _RIGHT - 4, y + 14 * len(groups) + 2], fill="white",
                 outline="gray")
  for k, (label, rgb, _) in enumerate(groups):
    y = _TOP + 4 + 14 * k
    draw.rectangle([x, y + 2, x + 8, y + 10], fill=rgb)
    draw.text((x + 12, y), label, fill="black", font=font)


def _lim(values, pad=0.05):
  lo, hi = float(np.min(values)), float(np.max(values))
  span = hi - lo or 1.0
  return lo - pad * span, hi + pad * span


def scatter(groups, title="", xlabel="x") -> np.ndarray:
  """groups: `(label, rgb, points [N, 2])`, drawn in order (later on top) -> uint8 [H, W, 3]."""
  xy = np.concatenate([np.asarray(p, np.float64).reshape(-1, 2) for _, _, p in groups])
  if not len(xy):
    raise ValueError("scatter: expected at least one point")
  img, draw, to_px = _panel(title, xlabel, _lim(xy[:, 0]), _lim(xy[:, 1]))
  for _, rgb, p in groups:
    p = np.asarray(p, np.float64).reshape(-1, 2)
    for u, v in zip(*to_px(p[:, 0], p[:, 1])):
      draw.ellipse([u - 2, v - 2, u + 2, v + 2], fill=rgb)
  _legend(draw, groups)
  return np.asarray(img)


def histogram(edges, groups, title="", xlabel="x") -> np.ndarray:
  """edges `[K + 1]`; groups `(label, rgb, heights [K])`, side by side in each bin."""
  edges = np.asarray(edges, np.float64)
  if edges.ndim != 1 or len(edges) < 2 or any(len(g[2]) != len(edges) - 1 for g in groups):
    raise ValueError(f"histogram: edges of shape {edges.shape} and heights of lengths "
                     f"{[len(g[2]) for g in groups]}: expected K + 1 edges and K heights")
  top = max(max(float(np.max(g[2])) for g in groups), 1e-12) * 1.1
  img, draw, to_px = _panel(title, xlabel, (edges[0], edges[-1]), (0.0, top))
  n = len(groups)
  for k, (_, rgb, heights) in enumerate(groups):
    for lo, hi, v in zip(edges[:-1], edges[1:], heights):
      a = lo + (hi - lo) * k / n
      (u0, u1), (v0, v1) = to_px([a, a + (hi - lo) / n], [0.0, v])
      if v > 0:
        draw.rectangle([u0, v1, max(u1 - 1, u0), v0], fill=rgb)
  _legend(draw, groups)
  return np.asarray(img)


def lines(groups, title="", xlabel="step", logy=None) -> np.ndarray:
  """groups: `(label, rgb, points [N, 2])` (x, y), each drawn as a polyline -> uint8 [H, W, 3].

  logy: a log10 y axis; None picks it when every y > 0 and they span over a factor of 20.
  """
  pts = [np.asarray(p, np.float64).reshape(-1, 2) for _, _, p in groups]
  xy = np.concatenate(pts) if pts else np.zeros((0, 2))
  if not len(xy) or not np.isfinite(xy).all():
    raise ValueError(f"lines: {len(xy)} points, expected at least one, all finite")
  if logy is None:
    logy = bool(xy[:, 1].min() > 0 and xy[:, 1].max() > 20 * xy[:, 1].min())
  if logy and xy[:, 1].min() <= 0:
    raise ValueError("lines: logy=True needs every y > 0")
  f = np.log10 if logy else (lambda v: v)
  ylim = _lim(f(xy[:, 1]))
  ytext = tuple(f"{10 ** v:.3g}" for v in ylim) if logy else None
  img, draw, to_px = _panel(title + (" (log y)" if logy else ""), xlabel, _lim(xy[:, 0], 0.0),
                            ylim, ytext)
  for (_, rgb, _), p in zip(groups, pts):
    u, v = to_px(p[:, 0], f(p[:, 1]))
    if len(p) == 1:
      draw.ellipse([u[0] - 2, v[0] - 2, u[0] + 2, v[0] + 2], fill=rgb)
    else:
      draw.line(list(zip(u.tolist(), v.tolist())), fill=rgb, width=2)
  _legend(draw, groups)
  return np.asarray(img)
