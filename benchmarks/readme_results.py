"""README's "Results of the last demo run" from a finished demo workdir, and its picture.

  python benchmarks/readme_results.py --workdir=runs/demo --commit=$(git rev-parse --short HEAD) \
      [--screenshot=docs/report.png]

Prints Markdown: the report's claims table (values ± one SE, difference ± 2 SE, verdict, as
`eval/summary.py` computes them), the main numbers of each system, and the stages' wall times,
from `W/report/metrics.json` and the per-row files the summary reads. With `--screenshot`,
headless Chromium renders the top of `W/report/index.html` to a PNG.
"""

import argparse
import os
import platform
import subprocess
import time

from vlbpe_jax.eval import report
from vlbpe_jax.eval import summary

STAGES = ("data", "vq", "bpe", "lm", "clip", "dit", "v2l")
# (label, metric, format); a row whose metric is absent is left out.
ROWS = [
    ("scene checker on ground-truth renders", "data.checker_exact_gt", "{:.2f}"),
    ("VQ validation PSNR (dB)", "vq.psnr_db", "{:.1f}"),
    ("VQ codebook usage", "vq.codebook_usage", "{:.0%}"),
    ("visual BPE: test cells per token", "bpe.compression", "{:.2f}"),
    ("VQA: full (BPE, 3 stages + curriculum)", "lm.vqa_acc.full", "{:.1%}"),
    ("VQA: no BPE", "lm.vqa_acc.no_bpe", "{:.1%}"),
    ("VQA: single stage", "lm.vqa_acc.single_stage", "{:.1%}"),
    ("VQA: text only (blind)", "lm.vqa_acc.text_only", "{:.1%}"),
    ("VQA, full, each question with another image", "lm.vqa_acc_wrong_image.full", "{:.1%}"),
    ("VQA, full, held-out compositions", "lm.vqa_acc_heldout.full", "{:.1%}"),
    ("captions, full: attribute precision", "lm.caption_precision.full", "{:.2f}"),
    ("captions, full: attribute recall", "lm.caption_recall.full", "{:.2f}"),
    ("CLIP zero-shot shape", "clip.zero_shot_shape_acc", "{:.1%}"),
    ("CLIP zero-shot colour", "clip.zero_shot_color_acc", "{:.1%}"),
    ("DiT GenEval: CLIP features + flow (BLIP3-o)", "dit.geneval.fm", "{:.3f}"),
    ("DiT GenEval: CLIP features + MSE", "dit.geneval.mse", "{:.3f}"),
    ("DiT GenEval: VQ latents + flow", "dit.geneval.vq_latent", "{:.3f}"),
    ("DiT GenEval ceiling: decoder(CLIP(real image))", "dit.geneval_upper_bound", "{:.3f}"),
    ("DiT FID in CLIP space: CLIP + flow / VQ latents + flow", "dit.fid_clip.fm", "{:.1f}"),
    ("V2L reconstruction PSNR, local + global tokens (dB)", "v2l.recon_psnr_db.local_global",
     "{:.1f}"),
    ("V2L few-shot, 2-way 1-shot (chance 50%)", "v2l.fewshot_acc.2way_1shot", "{:.1%}"),
    ("V2L few-shot, 5-way 1-shot (chance 20%)", "v2l.fewshot_acc.5way_1shot", "{:.1%}"),
    ("V2L text-only control, 5-way 1-shot", "v2l.fewshot_text_only.5way_1shot", "{:.1%}"),
]


def _md_value(side: summary.Side, percent: bool) -> str:
  if side.value is None:
    return f"{side.label}: not run"
  f = (lambda v: f"{v:.1%}") if percent else (lambda v: f"{v:.3g}")
  se = f" ± {f(side.se)}" if side.se else ""
  return f"{side.label}: **{f(side.value)}**{se}"


def _md_diff(c: summary.Claim) -> str:
  if c.diff is None:
    return "–"
  f = (lambda v: f"{v:+.1%}") if c.percent else (lambda v: f"{v:+.3g}")
  return f(c.diff) + ("" if c.diff_se is None else f" ± {f(2 * c.diff_se)[1:]}")


def tables(workdir: str) -> str:
  metrics = report.read_metrics(workdir)
  if not metrics:
    raise ValueError(f"workdir={workdir!r}: expected a finished run (report/metrics.json)")
  out = ["| seed claim | this run | compared with | difference ± 2 SE | verdict |",
         "| --- | --- | --- | --- | --- |"]
  for c in summary.claims(workdir, metrics):
    out.append(f"| {c.text} | {_md_value(c.a, c.percent)} | {_md_value(c.b, c.percent)} | "
               f"{_md_diff(c)} | {c.verdict} |")
  out += ["", "| metric | value |", "| --- | --- |"]
  for label, key, fmt in ROWS:
    if key in metrics:
      value = fmt.format(metrics[key])
      if key == "dit.fid_clip.fm" and "dit.fid_clip.vq_latent" in metrics:
        value += " / " + fmt.format(metrics["dit.fid_clip.vq_latent"])
      out.append(f"| {label} (`{key}`) | {value} |")
  runs = [r for r in ("full", "no_bpe", "single_stage") if f"lm.vqa_acc.{r}" in metrics]
  types = sorted({k.rsplit(".", 1)[1] for k in metrics if k.startswith("lm.vqa_acc_by_type.")})
  if runs and types:
    out += ["", "| VQA by question type: right / wrong image | " + " | ".join(runs) +
            " | text only |", "| --- " * (len(runs) + 2) + "|"]
    for t in types:
      cells = [f"{metrics.get(f'lm.vqa_acc_by_type.{r}.{t}', float('nan')):.2f} / "
               f"{metrics.get(f'lm.vqa_acc_by_type_wrong_image.{r}.{t}', float('nan')):.2f}"
               for r in runs]
      blind = metrics.get(f"lm.vqa_acc_by_type.text_only.{t}")
      out.append(f"| {t} | " + " | ".join(cells) +
                 f" | {'–' if blind is None else f'{blind:.2f}'} |")
  times = {s: metrics.get(f"time_s.{s}") for s in STAGES}
  out += ["", "| stage | " + " | ".join(s for s in STAGES if times[s] is not None) + " | total |",
          "| --- " * (1 + sum(t is not None for t in times.values()) + 1) + "|",
          "| wall s | " + " | ".join(f"{times[s]:.0f}" for s in STAGES if times[s] is not None)
          + f" | {sum(t for t in times.values() if t is not None):.0f} |"]
  return "\n".join(out)


def screenshot(workdir: str, out: str, width: int = 1280, height: int = 1400):
  page = os.path.abspath(os.path.join(report.report_dir(workdir), "index.html"))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                  "--hide-scrollbars", f"--window-size={width},{height}",
                  f"--screenshot={os.path.abspath(out)}", f"file://{page}"],
                 check=True, capture_output=True, timeout=120)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--commit", default="")
  ap.add_argument("--screenshot", default="")
  args = ap.parse_args()
  mtime = os.path.getmtime(os.path.join(report.report_dir(args.workdir), "metrics.json"))
  print(f"<!-- {args.workdir}, commit {args.commit or '?'}, finished "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(mtime))}, "
        f"{platform.machine()} with {os.cpu_count()} CPUs -->")
  print(tables(args.workdir))
  if args.screenshot:
    screenshot(args.workdir, args.screenshot)


if __name__ == "__main__":
  main()
