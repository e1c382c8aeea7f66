"""The Being-VL seed's training claims, tested over LM seeds and budgets (mean +- standard error).

  python benchmarks/claims.py --config=configs/tiny.py --workdir=runs/claims --seeds=0,1,2 \
      --budgets=1,4
  python benchmarks/claims.py --config=configs/tiny.py:tiny --workdir=/tmp/claims \
      --seeds=0,1 --runs=full,no_bpe          # minutes on a CPU (tests/test_claims.py)

The data, vq and bpe stages run once in --workdir (skipped when done there). Each (budget b,
seed s) then gets `<workdir>/claims/budget<b>/seed<s>/`: its data/, tokenizer/, vq/ and bpe/ are
symlinks to the base workdir's and its manifests of those stages copies, so the pipeline's
resume rule (vlbpe_jax/train.py) finds them up to date, and only the text (stage 0) and lm
stages run there, with lm.seed=s (LM init, data order, dropout), lm.stage_steps times b (stage
0 keeps lm.text_steps) and lm.runs=--runs. A rerun skips finished workdirs and resumes
interrupted ones.

From each workdir's lm report metrics (`lm.vqa_acc.<run>`, `lm.vqa_acc_heldout.<run>`,
`lm.vqa_acc_wrong_image.<run>`, `lm.vqa_acc_by_type.<run>.<type>`) it gives per run and budget
the mean +- standard error over seeds (std with ddof=1 over sqrt(n)), and a verdict per claim
(`CLAIMS`, on VQA accuracy): "holds" when the difference of the means exceeds two combined
standard errors (sqrt(se_a^2 + se_b^2)), "reversed" when it is below minus two, else "not
resolved" (so always with one seed: no error bar). Writes `<workdir>/claims.json` and
`claims.md` and prints the markdown. With `--record_out=docs/claims.json --commit=C` it also
writes the record the demo's report shows below its claims (`vlbpe_jax/eval/seed_claims.py`):
the result and the key of --config; a rerun over a finished workdir trains nothing.
"""

import math
import os
import shutil
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np

from vlbpe_jax import cli
from vlbpe_jax import fileio
from vlbpe_jax import manifest
from vlbpe_jax import train as pipeline
from vlbpe_jax.data import shapes
from vlbpe_jax.eval import longer_run
from vlbpe_jax.eval import report
from vlbpe_jax.eval import seed_claims
from vlbpe_jax.lm import train as lm_train

# (a, b, claim "a > b"). The seed: staged unfreezing + curriculum clearly beats single-stage
# training, and either one alone does worse than both; visual BPE beats raw VQ codes. That each
# alone still beats single stage is the ordering in between.
CLAIMS = (
    ("full", "no_bpe", "BPE > no BPE"),
    ("full", "single_stage", "staging + curriculum > single stage"),
    ("full", "staged_no_curriculum", "staging + curriculum > staging alone"),
    ("full", "curriculum_no_staging", "staging + curriculum > curriculum alone"),
    ("staged_no_curriculum", "single_stage", "staging alone > single stage"),
    ("curriculum_no_staging", "single_stage", "curriculum alone > single stage"),
)
CLAIM_METRIC = "vqa_acc"
# Metric name -> key in the lm report's metrics ({run} filled in); then one per question type.
METRICS = {"vqa_acc": "lm.vqa_acc.{run}", "vqa_acc_heldout": "lm.vqa_acc_heldout.{run}",
           "vqa_acc_wrong_image": "lm.vqa_acc_wrong_image.{run}"}
METRICS.update({f"vqa_acc_by_type.{t}": f"lm.vqa_acc_by_type.{{run}}.{t}"
                for t, _, _ in shapes.QUESTION_TYPES})
SHARED = ("data", "tokenizer", "vq", "bpe")  # the base workdir's folders every seed reads
SHARED_STAGES = ("data", "vq", "bpe")


def stats(values) -> dict:
  """{"mean", "se", "n"} of the non-missing values; se = std (ddof=1) / sqrt(n), None if n < 2."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  n = len(v)
  return {"mean": float(v.mean()) if n else None,
          "se": float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else None, "n": n}


def verdict(a: dict, b: dict) -> dict:
  """Claim `a > b` on two `stats`: the difference of means, its standard error and the verdict."""
  if a["se"] is None or b["se"] is None:
    diff = None if a["mean"] is None or b["mean"] is None else a["mean"] - b["mean"]
    return {"diff": diff, "se": None, "verdict": "not resolved"}
  diff, se = a["mean"] - b["mean"], math.hypot(a["se"], b["se"])
  word = "holds" if diff > 2 * se else "reversed" if diff < -2 * se else "not resolved"
  return {"diff": diff, "se": se, "verdict": word}


def aggregate(per_seed: dict, runs) -> dict:
  """per_seed {budget: {seed: {run: {metric: value}}}} -> {"summary": {budget: {run: {metric:
  stats}}}, "claims": [one dict per claim and budget whose two runs were trained]}."""
  summary, claims = {}, []
  for budget, seeds in per_seed.items():
    summary[budget] = {run: {m: stats([seeds[s][run].get(m) for s in seeds]) for m in METRICS}
                       for run in runs}
    for a, b, claim in CLAIMS:
      if a in runs and b in runs:
        claims.append({"budget": budget, "claim": claim, "a": a, "b": b, "metric": CLAIM_METRIC,
                       **verdict(summary[budget][a][CLAIM_METRIC],
                                 summary[budget][b][CLAIM_METRIC])})
  return {"summary": summary, "claims": claims}


def read_metrics(workdir: str, runs) -> dict:
  """{run: {metric: value or None}} from the lm report section of `workdir` (a metric without a
  value, e.g. no held-out question in a tiny split, is missing there)."""
  m = report.section_metrics(workdir, "lm")
  if m is None:
    raise ValueError(f"{workdir} has no lm report section: the lm stage has not finished there")
  return {run: {name: m.get(key.format(run=run)) for name, key in METRICS.items()}
          for run in runs}


def seed_workdir(workdir: str, budget: int, seed: int) -> str:
  return os.path.join(workdir, "claims", f"budget{budget}", f"seed{seed}")


def _link_shared(base: str, wd: str):
  """Points `wd`'s data/tokenizer/vq/bpe at the base workdir's; copies their manifests."""
  os.makedirs(os.path.join(wd, "manifests"), exist_ok=True)
  for name in SHARED:
    link, target = os.path.join(wd, name), os.path.abspath(os.path.join(base, name))
    if os.path.islink(link) and os.readlink(link) == target:
      continue
    if os.path.lexists(link):
      raise ValueError(f"{link} exists and is not a link to {target}; remove {wd} to redo it")
    os.symlink(target, link)
  for stage in SHARED_STAGES:
    shutil.copyfile(manifest.path(base, stage), manifest.path(wd, stage))


def lm_config(config, *, seed: int, budget: int, runs):
  """The lm-stage-only config of one (budget, seed)."""
  c = config.copy_and_resolve_references()
  if "seed" not in c.lm:
    raise ValueError("config.lm has no `seed` field (configs/tiny.py has it): cannot vary "
                     "the LM seed alone")
  c.stages = "text,lm"  # stage 0 (the text stage) trains with the LM seed too
  c.lm.seed = int(seed)
  c.lm.runs = tuple(runs)
  c.lm.stage_steps = tuple(int(budget) * int(n) for n in config.lm.stage_steps)
  return c


def _check(seeds, budgets, runs):
  join = lambda xs: ",".join(map(str, xs))  # noqa: E731
  if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds={join(seeds)}: expected distinct seeds >= 0")
  if not budgets or any(b < 1 for b in budgets) or len(set(budgets)) != len(budgets):
    raise ValueError(f"--budgets={join(budgets)}: expected distinct positive ints")
  bad = [r for r in runs if r not in lm_train.RUNS]
  if bad or not runs or len(set(runs)) != len(runs):
    raise ValueError(f"--runs={join(runs)}: expected distinct names of {lm_train.RUNS}")


def run(config, workdir: str, *, seeds, budgets, runs, command: str = "") -> dict:
  """Trains every (budget, seed) (resuming), aggregates, writes claims.json/.md; returns the
  JSON dict (its "markdown" entry holds the table)."""
  seeds, budgets, runs = [int(s) for s in seeds], [int(b) for b in budgets], list(runs)
  _check(seeds, budgets, runs)
  base = config.copy_and_resolve_references()
  base.stages = "data,vq,bpe"
  pipeline.train_and_evaluate(base, workdir)
  per_seed = {}
  for budget in budgets:
    per_seed[str(budget)] = {}
    for seed in seeds:
      wd = seed_workdir(workdir, budget, seed)
      logging.info("claims: budget %d, seed %d in %s", budget, seed, wd)
      _link_shared(workdir, wd)
      pipeline.train_and_evaluate(lm_config(config, seed=seed, budget=budget, runs=runs), wd)
      per_seed[str(budget)][str(seed)] = read_metrics(wd, runs)
  out = {"command": command, "seeds": seeds, "budgets": budgets, "runs": runs,
         "stage_steps": {str(b): [b * int(n) for n in config.lm.stage_steps] for b in budgets},
         "text_steps": int(config.lm.text_steps), "per_seed": per_seed,
         **aggregate(per_seed, runs)}
  out["markdown"] = markdown(out)
  fileio.write_json(os.path.join(workdir, "claims.json"), out, indent=1)
  fileio.write_text(os.path.join(workdir, "claims.md"), out["markdown"])
  return out


def fmt(s: dict) -> str:
  """`41.2 ± 1.3` (percent); `-` when missing, no `±` with one seed."""
  if s["mean"] is None:
    return "-"
  return f"{100 * s['mean']:.1f}" + ("" if s["se"] is None else f" ± {100 * s['se']:.1f}")


def _table(header, rows) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows])


def markdown(out: dict) -> str:
  """The tables of a `run` result: per budget the runs' accuracies, then the verdicts."""
  types = [t for t, _, _ in shapes.QUESTION_TYPES]
  lines = ["# Seed claims (benchmarks/claims.py)", ""]
  if out.get("command"):
    lines += [f"Command: `{out['command']}`", ""]
  lines += [f"LM seeds {', '.join(map(str, out['seeds']))} (lm.seed; data, VQ and BPE shared); "
            f"{out['text_steps']} text-only steps (stage 0) then lm.stage_steps per budget. VQA "
            "accuracy in %, mean ± standard error over seeds (std, ddof=1, / sqrt(n)); "
            "n: seeds with a value.", ""]
  for budget, by_run in out["summary"].items():
    steps = tuple(out["stage_steps"][budget])
    lines += [f"## Budget x{budget}: lm.stage_steps {steps}", ""]
    lines += _table(["run", "n", "VQA acc", "held-out", "wrong image"] + types,
                    [(r, s["vqa_acc"]["n"], fmt(s["vqa_acc"]), fmt(s["vqa_acc_heldout"]),
                      fmt(s["vqa_acc_wrong_image"]))
                     + tuple(fmt(s[f"vqa_acc_by_type.{t}"]) for t in types)
                     for r, s in by_run.items()])
    lines.append("")
  lines += ["## Claims (VQA accuracy)", "",
            "\"holds\": the difference of the means exceeds two combined standard errors "
            "(sqrt(se_a² + se_b²)); \"reversed\": it is below minus two; else \"not resolved\".",
            ""]
  rows = []
  for c in out["claims"]:
    diff = "-" if c["diff"] is None else f"{100 * c['diff']:+.1f}"
    two_se = "-" if c["se"] is None else f"{200 * c['se']:.1f}"
    rows.append((f"x{c['budget']}", c["claim"], f"{c['a']} - {c['b']}", diff, two_se,
                 f"**{c['verdict']}**"))
  lines += _table(["budget", "claim", "runs", "difference", "2 SE", "verdict"], rows)
  if not rows:
    lines.append("(no claim has both of its runs in --runs)")
  return "\n".join(lines) + "\n"


def _ints(name: str, values) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError as e:
    raise ValueError(f"--{name}={','.join(values)}: expected comma-separated ints") from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  jax.config.update("jax_threefry_partitionable", True)
  f = flags.FLAGS
  if f.record_out and not f.commit.strip():
    raise ValueError(f"--record_out={f.record_out}: needs --commit (the commit the runs were "
                     "made at), which the record and the report name")
  out = run(f.config, f.workdir, seeds=_ints("seeds", f.seeds),
            budgets=_ints("budgets", f.budgets), runs=f.runs,
            command=" ".join(["python benchmarks/claims.py"] + sys.argv[1:]))
  if f.record_out:
    last = max(os.path.getmtime(os.path.join(seed_workdir(f.workdir, b, s), "report",
                                              "metrics.json"))
               for b in out["budgets"] for s in out["seeds"])  # when the last LM run ended
    finished = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(last))
    config_name = os.path.relpath(config_flags.get_config_filename(flags.FLAGS["config"]))
    rec = seed_claims.record(out, f.config, config=config_name, commit=f.commit,
                             finished=finished, machine=longer_run.machine())
    fileio.write_json(f.record_out, rec, indent=1)
  print(out["markdown"])


if __name__ == "__main__":
  config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                             "tiny.py"), "Pipeline config (configs/tiny.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Base workdir: data/vq/bpe here, each seed under "
                      "claims/budget<b>/seed<s>/; claims.json and claims.md here.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "LM seeds (lm.seed).")
  flags.DEFINE_list("budgets", ["1"], "Multipliers of lm.stage_steps.")
  flags.DEFINE_list("runs", list(lm_train.RUNS), "LM runs to train (lm.runs).")
  flags.DEFINE_string("record_out", "", "Also write the result as the record the demo's report "
                      "shows (eval/seed_claims.py), e.g. docs/claims.json; needs --commit. The "
                      "record names this host as the machine: write it where the runs trained.")
  flags.DEFINE_string("commit", "", "The commit the runs were made at (for --record_out).")
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
