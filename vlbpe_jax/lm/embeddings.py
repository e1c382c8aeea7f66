"""Text vs visual embedding rows of the unified LM: separation, 2D PCA, row norms, a figure.

Being-VL claims that visual-token embeddings stay apart from (distributed differently than) the
text embeddings. We measure one number,

  separation = |mean(text rows) - mean(visual rows)| / mean row norm over both tables,

(0: the tables share their centre; 1: the centres are an average row's length apart), its
values when the rows are dealt to the two tables at random (what finite tables of one
distribution give: ~sqrt(1/Nt + 1/Nv) for isotropic rows; their mean and the share at least
as large, a permutation p-value), and draw a 2D PCA of both tables
together and the histogram of their row norms:

  s = summary(text, visual)   # text [Nt, D], visual [Nv, D]; a JSON-able dict
  img = figure(s)              # uint8 [H, W, 3] for report.save_image
"""

import numpy as np

from vlbpe_jax.eval import plots

MAX_POINTS = 2048  # rows per table kept for the PCA fit and scatter (evenly spaced)
BINS = 24


def _check(name, x):
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or not x.shape[0] or x.shape[1] < 2:
    raise ValueError(f"{name} of shape {x.shape}: expected [N, D] rows with N >= 1, D >= 2")
  if not np.isfinite(x).all():
    raise ValueError(f"{name}: expected finite values")
  return x


def _check_pair(text, visual):
  text, visual = _check("text", text), _check("visual", visual)
  if text.shape[1] != visual.shape[1]:
    raise ValueError(f"text width {text.shape[1]} != visual width {visual.shape[1]}: expected "
                     "rows of one model")
  return text, visual


def separation(text, visual) -> float:
  """|mean(text) - mean(visual)| / mean L2 norm of all rows. text `[Nt, D]`, visual `[Nv, D]`."""
  text, visual = _check_pair(text, visual)
  norm = np.linalg.norm(np.concatenate([text, visual]), axis=1).mean()
  return float(np.linalg.norm(text.mean(0) - visual.mean(0)) / max(norm, 1e-30))


def shuffled_separations(text, visual, num: int = 100, seed: int = 0) -> np.ndarray:
  """`separation` of `num` random relabellings of the rows (same table sizes): `[num]`."""
  text, visual = _check_pair(text, visual)
  x = np.concatenate([text, visual])
  norm = max(np.linalg.norm(x, axis=1).mean(), 1e-30)
  rng = np.random.default_rng(seed)
  perms = [rng.permutation(len(x)) for _ in range(num)]
  return np.array([np.linalg.norm(x[p[:len(text)]].mean(0) - x[p[len(text):]].mean(0)) / norm
                   for p in perms])


def pca_2d(x):
  """x `[N, D]` -> (points `[N, 2]` on the top two principal axes, axes `[2, D]`, explained
  variance fraction `[2]`). Signs: each axis's largest-magnitude loading is positive."""
  x = _check("x", x)
  centred = x - x.mean(0)
  _, s, vt = np.linalg.svd(centred, full_matrices=False)  # vt: [min(N, D), D]
  axes = np.zeros((2, x.shape[1]))
  axes[:min(2, len(vt))] = vt[:2]
  axes *= np.where(np.take_along_axis(axes, np.abs(axes).argmax(1)[:, None], 1) < 0, -1, 1)
  var = np.zeros(2)
  var[:min(2, len(s))] = (s[:2] ** 2) / max((s ** 2).sum(), 1e-30)
  return centred @ axes.T, axes, var


def _every(x, n):
  return x if len(x) <= n else x[np.linspace(0, len(x) - 1, n).round().astype(int)]


def summary(text, visual) -> dict:
  """The separation, mean norms, PCA points (at most MAX_POINTS rows per table) and norm
  histogram of both tables, as plain floats and lists (stored with a run's result)."""
  text, visual = _check_pair(text, visual)
  nt, nv = np.linalg.norm(text, axis=1), np.linalg.norm(visual, axis=1)
  sep, shuffled = separation(text, visual), shuffled_separations(text, visual)
  t, v = _every(text, MAX_POINTS), _every(visual, MAX_POINTS)
  points, _, var = pca_2d(np.concatenate([t, v]))
  edges = np.histogram_bin_edges(np.concatenate([nt, nv]), BINS)
  return dict(
      separation=sep, separation_shuffled=float(shuffled.mean()),
      # Permutation p-value: the share of relabellings at least as separated (with the data).
      separation_p=float((1 + (shuffled >= sep).sum()) / (1 + len(shuffled))),
      num_text=len(text), num_visual=len(visual),
      mean_norm_text=float(nt.mean()), mean_norm_visual=float(nv.mean()),
      pca_text=points[:len(t)].tolist(), pca_visual=points[len(t):].tolist(),
      pca_explained=var.tolist(), norm_edges=edges.tolist(),
      norm_hist_text=np.histogram(nt, edges)[0].tolist(),
      norm_hist_visual=np.histogram(nv, edges)[0].tolist())


def figure(s: dict, title: str = "") -> np.ndarray:
  """PCA scatter | norm histogram (share of each table's rows) of a `summary` -> uint8 image."""
  text = f"text ({s['num_text']} rows)"
  visual = f"visual ({s['num_visual']} rows)"
  e = s["pca_explained"]
  groups = [(text, plots.BLUE, s["pca_text"]), (visual, plots.ORANGE, s["pca_visual"])]
  pca = plots.scatter(groups,
                      title=f"{title}: PCA, PC1 {e[0]:.0%} (x), PC2 {e[1]:.0%} (y) of variance",
                      xlabel="PC1")
  share = lambda h: np.asarray(h) / max(sum(h), 1)
  hist = plots.histogram(s["norm_edges"], [(text, plots.BLUE, share(s["norm_hist_text"])),
                                           (visual, plots.ORANGE, share(s["norm_hist_visual"]))],
                         title=f"{title}: row L2 norms (share of each table)", xlabel="row norm")
  return np.concatenate([pca, hist], axis=1)
