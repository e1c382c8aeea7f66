"""One HTML report and one metrics.json for the whole pipeline.

Every stage adds its own section; the report is rebuilt from all sections each time, so a
resumed run (or a stage re-run alone) keeps what the other stages wrote:

  workdir/report/index.html           # the page, sections sorted by `order`
  workdir/report/metrics.json         # flat {"vq.psnr_db": 31.2, ...}: every section's metrics
  workdir/report/sections/<key>.json  # {"title", "order", "html", "metrics"} of one stage
  workdir/report/<key>/...            # pictures saved by `save_image` (by convention under
                                      # the section's key, so `remove_section` drops them too)
  workdir/report/curves/*.png         # training curves (`curves.py`), redrawn with the page

The page leads with the seed's claims against this run's numbers (`summary.py`) and any section
of negative `order` (what qualifies them, e.g. a longer run's numbers), then the training
curves, the other sections, and every metric in a collapsed table.

metrics.json is rebuilt from the sections, so removing a section (a stage whose inputs
changed) removes its numbers too: the page never shows a number its section did not produce.

  report.add_section(workdir, key="bpe", title="Visual BPE", order=30,
                     html="<p>...</p>", metrics={"bpe.compression": 2.9})
"""

import html as html_lib
import math
import os
import shutil
import threading

import numpy as np
from PIL import Image

from vlbpe_jax import fileio
from vlbpe_jax.eval import curves
from vlbpe_jax.eval import summary

_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #aaa; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
img.pix { image-rendering: pixelated; }
.small { font-size: 85%; color: #555; }
#summary { width: 100%; } #summary td:first-child { width: 24%; }
td.verdict { font-weight: bold; } td.holds { background: #d9f2d9; }
td.does_not_hold { background: #f8d7d7; } td.inconclusive { background: #f2f2f2; }
td.not_run { color: #777; font-style: italic; }
p.stale { background: #fff3cd; padding: 4px 8px; }
.curves { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; } figcaption { font-size: 85%; color: #555; text-align: center; }
details summary { cursor: pointer; }
"""


# Stages may run on several threads (`config.stage_workers`): the page is read, rebuilt and
# written by one of them at a time, so no thread overwrites it with a page lacking a section
# another thread just added.
_LOCK = threading.RLock()


def report_dir(workdir: str) -> str:
  return os.path.join(workdir, "report")


def _check_metrics(metrics: dict) -> dict:
  out = {}
  for k, v in metrics.items():
    if not isinstance(k, str) or "." not in k:
      raise ValueError(f"metric key {k!r}: expected a namespaced string like 'vq.psnr_db'")
    if isinstance(v, (bool, np.bool_)):
      v = bool(v)
    elif isinstance(v, (int, float, np.integer, np.floating)):
      v = float(v) if isinstance(v, (float, np.floating)) else int(v)
      if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"metric {k}={v}: expected a finite number")
    elif not isinstance(v, str):
      raise ValueError(f"metric {k}={v!r}: expected a number, bool or string")
    out[k] = v
  return out


def read_metrics(workdir: str) -> dict:
  path = os.path.join(report_dir(workdir), "metrics.json")
  if not os.path.exists(path):
    return {}
  return fileio.read_json(path, what="report metrics")


def add_section(workdir: str, key: str, title: str, order: int, html: str,
                metrics: dict | None = None) -> str:
  """Adds (or replaces) the section `key` with its `metrics`; rebuilds the page.

  Returns the path of index.html.
  """
  if not key.isidentifier():
    raise ValueError(f"section key {key!r}: expected an identifier like 'vq'")
  metrics = _check_metrics(metrics or {})
  with _LOCK:
    fileio.write_json(os.path.join(report_dir(workdir), "sections", f"{key}.json"),
                      {"title": title, "order": int(order), "html": html, "metrics": metrics})
    return build_index(workdir)


def remove_section(workdir: str, key: str) -> bool:
  """Drops section `key`, its metrics and its pictures (`report/<key>/`); rebuilds the page.
  Returns whether there was such a section."""
  rdir = report_dir(workdir)
  path = os.path.join(rdir, "sections", f"{key}.json")
  with _LOCK:
    had = os.path.exists(path)
    if had:
      os.remove(path)
    shutil.rmtree(os.path.join(rdir, key), ignore_errors=True)
    if had:
      build_index(workdir)
  return had


def section_metrics(workdir: str, key: str) -> dict | None:
  """The metrics of section `key`, or None when there is no such section."""
  path = os.path.join(report_dir(workdir), "sections", f"{key}.json")
  if not os.path.exists(path):
    return None
  return fileio.read_json(path, what=f"report section {key!r}").get("metrics", {})


def build_index(workdir: str) -> str:
  """Writes metrics.json and index.html: the claims summary (`summary.py`), the training curves
  (`curves.py`), the sections, then every metric in a collapsed table."""
  with _LOCK:
    return _build_index(workdir)


def _build_index(workdir: str) -> str:
  rdir = report_dir(workdir)
  sdir = os.path.join(rdir, "sections")
  sections = []
  for name in sorted(os.listdir(sdir)) if os.path.isdir(sdir) else []:
    if name.endswith(".json"):
      s = fileio.read_json(os.path.join(sdir, name), what="report section")
      sections.append(dict(s, key=name[:-len(".json")]))
  sections.sort(key=lambda s: (s["order"], s["title"]))
  metrics = {}
  for s in sections:
    metrics.update(s.get("metrics", {}))
  metrics = dict(sorted(metrics.items()))
  fileio.write_json(os.path.join(rdir, "metrics.json"), metrics, indent=1)
  rows = "".join(f"<tr><td><code>{html_lib.escape(k)}</code></td><td>{_fmt(v)}</td></tr>"
                 for k, v in metrics.items())
  curves_html = curves.render(workdir, {s["key"] for s in sections})
  # Sections with order < 0 qualify the results: shown right below the claims table.
  top = "".join(f"<h2 id='{s['key']}'>{html_lib.escape(s['title'])}</h2>\n{s['html']}\n"
                for s in sections if s["order"] < 0)
  sections = [s for s in sections if s["order"] >= 0]
  toc = "".join(f"<li><a href='#{s['key']}'>{html_lib.escape(s['title'])}</a></li>"
                for s in sections)
  body = "".join(f"<h2 id='{s['key']}'>{html_lib.escape(s['title'])}</h2>\n{s['html']}\n"
                 for s in sections)
  page = (f"<!doctype html><html><head><meta charset='utf-8'><title>vlbpe_jax report</title>"
          f"<style>{_STYLE}</style></head><body><h1>vlbpe_jax report</h1>"
          f"<h2 id='results'>Results: the seed's claims in this run</h2>"
          f"{summary.to_html(summary.claims(workdir, metrics))}{top}"
          + (f"<h2 id='curves'>Training curves</h2>{curves_html}" if curves_html else "")
          + f"<h2 id='sections'>Stages</h2><ol>{toc}</ol>{body}"
          f"<h2 id='metrics'>All metrics</h2><details id='all_metrics'><summary>{len(metrics)} "
          f"metrics (<code>report/metrics.json</code>)</summary><table>{rows}</table></details>"
          "</body></html>")
  path = os.path.join(rdir, "index.html")
  fileio.write_text(path, page)
  return path


def _fmt(v) -> str:
  if v is None:
    return "&ndash;"
  if isinstance(v, float):
    return f"{v:.4g}"
  return html_lib.escape(str(v))


def save_image(workdir: str, relpath: str, image) -> str:
  """Saves a uint8 `[H, W, 3]` (or `[H, W]`) image under the report dir; returns `relpath`."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise ValueError(f"image of dtype {image.dtype} and shape {image.shape}: expected uint8 "
                     "[H, W] or [H, W, 3]")
  if os.path.isabs(relpath) or ".." in relpath.split("/"):
    raise ValueError(f"relpath={relpath!r}: expected a relative path inside the report")
  path = os.path.join(report_dir(workdir), relpath)
  with fileio.atomic_file(path) as tmp:
    Image.fromarray(image).save(tmp, format="PNG")
  return relpath


def image_grid(images, ncols: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """Tiles uint8 images `[N, H, W, C]` into one `[rows*(H+pad)-pad, ..., C]` picture."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"images of shape {images.shape}: expected [N, H, W, C] with N > 0")
  n, h, w, c = images.shape
  ncols = max(1, min(ncols, n))
  nrows = -(-n // ncols)
  out = np.full((nrows * (h + pad) - pad, ncols * (w + pad) - pad, c), pad_value,
                images.dtype)
  for i in range(n):
    r, k = divmod(i, ncols)
    out[r * (h + pad):r * (h + pad) + h, k * (w + pad):k * (w + pad) + w] = images[i]
  return out


def img_tag(relpath: str, width: int | None = None, pixelated: bool = True) -> str:
  w = f" width='{width}'" if width else ""
  cls = " class='pix'" if pixelated else ""
  return f"<img src='{html_lib.escape(relpath)}'{w}{cls}>"


def table(header, rows) -> str:
  """An HTML table; cells are escaped unless they are `Markup` (pre-built html strings)."""
  cell = lambda x: x if isinstance(x, Markup) else _fmt(x)
  head = "".join(f"<th>{html_lib.escape(str(h))}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{cell(x)}</td>" for x in r) + "</tr>" for r in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


class Markup(str):
  """A string of trusted HTML that `table` inserts as is."""
