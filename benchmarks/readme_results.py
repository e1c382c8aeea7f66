"""README's "Results of the last demo run" from a finished demo workdir, and its picture.

  python benchmarks/readme_results.py --workdir=runs/demo --commit=$(git rev-parse --short HEAD) \
      [--screenshot=docs/report.png] [--config=configs/tiny.py:long --longer_run_out=F]

Prints Markdown: the report's claims table (values ± one SE, difference ± 2 SE, verdict, as
`eval/summary.py` computes them), the main numbers of each system, and the stages' wall times,
from `W/report/metrics.json` and the per-row files the summary reads. With `--screenshot`,
headless Chromium renders the top of `W/report/index.html` to a PNG. With `--longer_run_out`,
it also records the run for the demo report's "What a longer run gives" (`eval/longer_run.py`).
"""

import argparse
import os
import subprocess
import time

from vlbpe_jax import fileio
from vlbpe_jax.eval import longer_run
from vlbpe_jax.eval import report
from vlbpe_jax.eval import summary

STAGES = longer_run.STAGES


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
  for label, key, fmt in longer_run.HEADLINE:
    if key in metrics:
      out.append(f"| {label} (`{key}`) | {fmt.format(metrics[key])} |")
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
  # "sum": more than the run's wall where stages ran at once (config.stage_workers).
  out += ["", "| stage | " + " | ".join(s for s in STAGES if times[s] is not None) + " | sum |",
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
  ap.add_argument("--config", default="configs/tiny.py",
                  help="the config the workdir was trained with (recorded with --longer_run_out)")
  ap.add_argument("--longer_run_out", default="",
                  help="also write the run's headline numbers as the longer-run record the "
                       "demo's report compares with (eval/longer_run.py), e.g. "
                       "docs/longer_run.json; needs --commit")
  args = ap.parse_args()
  mtime = os.path.getmtime(os.path.join(report.report_dir(args.workdir), "metrics.json"))
  finished = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(mtime))
  machine = longer_run.machine()
  print(f"<!-- {args.workdir}, commit {args.commit or '?'}, finished {finished}, {machine} -->")
  if args.longer_run_out:
    rec = longer_run.record(report.read_metrics(args.workdir), config=args.config,
                            commit=args.commit, finished=finished, machine=machine)
    fileio.write_json(args.longer_run_out, rec, indent=1)
  print(tables(args.workdir))
  if args.screenshot:
    screenshot(args.workdir, args.screenshot)


if __name__ == "__main__":
  main()
