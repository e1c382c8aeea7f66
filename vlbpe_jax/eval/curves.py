"""Training curves for the report: the loss per step of every stage's runs, one panel per stage.

Reads the `metrics.jsonl` each trainer writes (`summary.MetricWriter`): `W/vq/`, `W/text/` and
`W/lm/<run>/` (stage 0 and every run of the ablation on one axis), `W/clip/`, `W/pixel_decoder/`,
`W/dit/<design>/` (the designs on one axis), `W/text_icl/` (V2L's frozen LM) and
`W/v2l/`. Draws only the panels of stages whose report section
exists, so a removed stage's curves leave with its numbers.

  html = curves.render(workdir, section_keys={"vq", "lm"})  # writes report/curves/*.png
"""

import glob
import html as html_lib
import math
import os
import shutil

from absl import logging
from PIL import Image

from vlbpe_jax import fileio
from vlbpe_jax import summary
from vlbpe_jax.eval import plots

LOSS = "train/loss"
DIR = "curves"  # under report/
# (png name, section key, title, run dirs under W (globs), run dirs left out)
PANELS = (
    ("vq", "vq", "VQ tokenizer", ("vq",), ()),
    ("lm", "lm", "Unified LM: stage 0 and every run", ("text", "lm/*"), ()),
    ("clip", "clip", "CLIP", ("clip",), ()),
    ("pixel_decoder", "pixel_decoder", "BLIP3-o pixel decoder (CLIP features -> pixels)",
     ("pixel_decoder",), ()),
    ("dit", "dit", "DiT: every design", ("dit/*",), ()),
    ("text_icl", "text_icl", "V2L's frozen LM: stage 0 continued on lm.text_phases",
     ("text_icl",), ()),
    ("v2l", "v2l", "V2L tokenizer", ("v2l", "v2l/*"), ()),
)


def series(workdir: str, patterns, exclude=()) -> list[tuple[str, list]]:
  """`(run label, [(step, loss), ...])` of every run dir matching `patterns` with a loss."""
  out = []
  for pattern in patterns:
    for d in sorted(glob.glob(os.path.join(workdir, pattern))):
      rel = os.path.relpath(d, workdir)
      if rel in exclude or not os.path.isfile(os.path.join(d, "metrics.jsonl")):
        continue
      try:
        records = summary.read_jsonl(os.path.join(d, "metrics.jsonl"))
      except fileio.CorruptArtifactError as e:  # the page still builds; the log says why
        logging.warning("curves: %s left out: %s", rel, e)
        continue
      pts = [(r["step"], r[LOSS]) for r in records
             if isinstance(r.get(LOSS), (int, float)) and math.isfinite(r[LOSS])]
      if pts:
        out.append((os.path.basename(d) if "/" in rel else rel, pts))
  return out


def render(workdir: str, section_keys) -> str:
  """Redraws `report/curves/`; returns the html of its images (empty without any curve)."""
  out_dir = os.path.join(workdir, "report", DIR)
  shutil.rmtree(out_dir, ignore_errors=True)
  figs = []
  for name, key, title, patterns, exclude in PANELS:
    runs = series(workdir, patterns, exclude) if key in section_keys else []
    if not runs:
      continue
    groups = [(label, plots.PALETTE[k % len(plots.PALETTE)], pts)
              for k, (label, pts) in enumerate(runs)]
    img = plots.lines(groups, title=f"{title}: {LOSS}")
    with fileio.atomic_file(os.path.join(out_dir, f"{name}.png")) as tmp:
      Image.fromarray(img).save(tmp, format="PNG")
    figs.append(f"<figure><img src='{DIR}/{name}.png' alt='{html_lib.escape(title)}'>"
                f"<figcaption>{html_lib.escape(title)}</figcaption></figure>")
  return f"<div class='curves'>{''.join(figs)}</div>" if figs else ""
