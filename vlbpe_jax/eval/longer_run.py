"""What a longer run gives: this run's headline numbers beside those of a recorded longer run.

The demo (`configs/tiny.py`) fits its 15-minute budget with fewer steps than its stages can use;
`configs/tiny.py:long` trains them for longer. One finished run of the long config is recorded
in a JSON file (`docs/longer_run.json`), written from its workdir by

  python benchmarks/readme_results.py --workdir=W --commit=C --config=configs/tiny.py:long \
      --longer_run_out=docs/longer_run.json

and the report shows it beside the current run, right below the claims (section `longer_run`;
`config.longer_run` names the file, "" = no comparison). The file says which config, commit,
machine and date produced it, and the page says so too: its numbers are a record of that run,
never of this one.

  {"config": "configs/tiny.py:long", "commit": "0788cfc", "finished": "2026-12-04 15:20 UTC",
   "machine": "x86_64, 2 CPUs", "metrics": {"lm.vqa_acc.full": 0.445, "time_s.vq": 477.0, ...}}
"""

import html as html_lib
import math
import os
import platform

from vlbpe_jax import fileio

STAGES = ("data", "text", "vq", "bpe", "lm", "clip", "pixel_decoder", "text_icl", "dit", "v2l")
# The numbers a person reads first: (label, metric, format). README's results table and the
# report's comparison with the longer run use these rows; a row whose metric is absent is left out.
HEADLINE = (
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
    ("VQA, full: colour", "lm.vqa_acc_by_type.full.color", "{:.2f}"),
    ("VQA, full: shape", "lm.vqa_acc_by_type.full.shape", "{:.2f}"),
    ("VQA, full: position", "lm.vqa_acc_by_type.full.position", "{:.2f}"),
    ("VQA, full: count", "lm.vqa_acc_by_type.full.count", "{:.2f}"),
    ("captions, full: attribute precision", "lm.caption_precision.full", "{:.2f}"),
    ("captions, full: attribute recall", "lm.caption_recall.full", "{:.2f}"),
    ("CLIP zero-shot shape", "clip.zero_shot_shape_acc", "{:.1%}"),
    ("CLIP zero-shot colour", "clip.zero_shot_color_acc", "{:.1%}"),
    ("DiT GenEval: CLIP features + flow (BLIP3-o)", "dit.geneval.fm", "{:.3f}"),
    ("DiT GenEval, CLIP + flow: the same images against another prompt (control)",
     "dit.geneval_wrong_prompt.fm", "{:.3f}"),
    ("DiT GenEval: CLIP features + MSE", "dit.geneval.mse", "{:.3f}"),
    ("DiT GenEval: VQ latents + flow", "dit.geneval.vq_latent", "{:.3f}"),
    ("DiT GenEval, VQ latents + flow: against another prompt (control)",
     "dit.geneval_wrong_prompt.vq_latent", "{:.3f}"),
    ("DiT GenEval ceiling: decoder(CLIP(real image))", "dit.geneval_upper_bound", "{:.3f}"),
    ("pixel decoder: PSNR of decoder(CLIP(test image)) (dB)", "pixel_decoder.psnr_db", "{:.1f}"),
    ("DiT FID in CLIP space: CLIP + flow", "dit.fid_clip.fm", "{:.1f}"),
    ("DiT FID in CLIP space: VQ latents + flow", "dit.fid_clip.vq_latent", "{:.1f}"),
    ("V2L reconstruction PSNR, local + global tokens (dB)", "v2l.recon_psnr_db.local_global",
     "{:.1f}"),
    ("V2L local tokens in use on the test split", "v2l.codebook_usage", "{:.0%}"),
    ("V2L inpainting gain: frozen LM (dB)", "v2l.restore_psnr_gain_db.inpaint", "{:+.2f}"),
    ("V2L inpainting gain: majority-vote control, no LM (dB)",
     "v2l.restore_psnr_gain_db_majority.inpaint", "{:+.2f}"),
    ("V2L deblurring gain: frozen LM (dB)", "v2l.restore_psnr_gain_db.deblur", "{:+.2f}"),
    ("V2L deblurring gain: majority-vote control (dB)",
     "v2l.restore_psnr_gain_db_majority.deblur", "{:+.2f}"),
    ("V2L text-only restoration (n = 2, random ids): frozen LM", "v2l.restore_text_only.n2",
     "{:.0%}"),
    ("V2L few-shot, 2-way 1-shot (chance 50%)", "v2l.fewshot_acc.2way_1shot", "{:.1%}"),
    ("V2L few-shot, 5-way 1-shot (chance 20%)", "v2l.fewshot_acc.5way_1shot", "{:.1%}"),
    ("V2L text-only control, 5-way 1-shot", "v2l.fewshot_text_only.5way_1shot", "{:.1%}"),
    ("V2L token-overlap control (no LM), 5-way 1-shot", "v2l.fewshot_overlap.5way_1shot",
     "{:.1%}"),
    ("V2L few-shot by colour, 5-way 1-shot: frozen LM", "v2l.fewshot_acc_color.5way_1shot",
     "{:.1%}"),
    ("V2L few-shot by colour, 5-way 1-shot: token-overlap control",
     "v2l.fewshot_overlap_color.5way_1shot", "{:.1%}"),
)
# Provenance of a record (this one and eval/seed_claims.py's): non-empty strings.
FIELDS = ("config", "commit", "finished", "machine")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def machine() -> str:
  """This host in words for a record: 'x86_64 with 2 CPUs (AMD EPYC, family 25 model 17)'."""
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        k, _, v = line.partition(":")
        info.setdefault(k.strip(), v.strip())
  except OSError:
    pass
  cpu = ", ".join(x for x in (info.get("model name"), info.get("cpu family") and
                              f"family {info['cpu family']} model {info.get('model', '?')}") if x)
  return f"{platform.machine()} with {os.cpu_count()} CPUs" + (f" ({cpu})" if cpu else "")


def provenance(fields: dict, what: str) -> dict:
  """`fields` as a record stores them: exactly `FIELDS`, each a non-empty string; a ValueError
  names the missing, empty or unknown ones (`what`: the record's kind, for the message)."""
  missing = [f for f in FIELDS if not str(fields.get(f, "")).strip()]
  if missing or set(fields) - set(FIELDS):
    raise ValueError(f"{what} fields {sorted(fields)} (missing or empty: {missing}): "
                     f"expected exactly {list(FIELDS)}, each a non-empty string")
  return {f: str(fields[f]) for f in FIELDS}


def missing_provenance(rec: dict) -> list:
  """The `FIELDS` a stored record lacks or holds as anything but a non-empty string."""
  return [f for f in FIELDS if not isinstance(rec.get(f), str) or not rec[f]]


def resolve(path: str) -> str:
  """`path` itself when absolute, else relative to the repository root (where configs/ is)."""
  return path if os.path.isabs(path) else os.path.join(_REPO, path)


def record(metrics: dict, **fields) -> dict:
  """The longer-run file of a finished run: its headline metrics and stage times, and `fields`
  (config, commit, finished, machine: all non-empty strings)."""
  prov = provenance(fields, "longer-run")
  keys = [k for _, k, _ in HEADLINE] + [f"time_s.{s}" for s in STAGES]
  kept = {k: float(metrics[k]) for k in keys if k in metrics}
  if not any(k.startswith("lm.") for k in kept):
    raise ValueError(f"metrics hold no headline number of the lm stage ({len(metrics)} keys): "
                     f"expected a finished demo run's report/metrics.json")
  return {**prov, "metrics": kept}


def read(path: str) -> dict:
  """The longer-run file at `path` (see `resolve`), checked; ValueError names what is wrong."""
  full = resolve(path)
  if not os.path.isfile(full):
    raise ValueError(f"config.longer_run={path!r}: no such file ({full}); expected a file "
                     f"written by benchmarks/readme_results.py --longer_run_out, or \"\"")
  ref = fileio.read_json(full, what="longer-run record")
  bad = missing_provenance(ref)
  metrics = ref.get("metrics")
  if bad or not isinstance(metrics, dict):
    raise ValueError(f"longer-run record {full}: fields {bad or ['metrics']} missing or empty; "
                     f"expected {list(FIELDS) + ['metrics']}")
  for k, v in metrics.items():
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise ValueError(f"longer-run record {full}: metric {k}={v!r}; expected a finite number")
  return ref


def _cell(fmt: str, v) -> str:
  return "&ndash;" if v is None else fmt.format(v)


def to_html(metrics: dict, ref: dict) -> str:
  """Table: each headline metric (and stage time) of this run beside the longer run's."""
  other = ref["metrics"]
  rows = [(label, key, fmt) for label, key, fmt in HEADLINE if key in metrics or key in other]
  rows += [(f"wall seconds of stage {s}", f"time_s.{s}", "{:.0f}") for s in STAGES
           if f"time_s.{s}" in metrics or f"time_s.{s}" in other]
  body = "".join(
      f"<tr><td>{html_lib.escape(label)} <code class='small'>{html_lib.escape(key)}</code></td>"
      f"<td>{_cell(fmt, metrics.get(key))}</td><td>{_cell(fmt, other.get(key))}</td></tr>"
      for label, key, fmt in rows)
  prov = html_lib.escape(f"{ref['config']} at commit {ref['commit']}, finished "
                         f"{ref['finished']} on {ref['machine']}")
  return ("<p>This run fits the demo's time budget with fewer training steps than its stages "
          "can use, so read the verdicts above beside this table: a run that is further from "
          "converged than the one it is compared with (e.g. the no-BPE run, whose raw VQ codes "
          "make image sequences ~4.7x longer) widens or reverses a difference. The right "
          f"column is a recorded run of the longer config ({prov}): numbers of that run, not "
          "of this one.</p>"
          "<table id='longer_run_table'><tr><th>metric</th><th>this run</th>"
          "<th>longer run</th></tr>" + body + "</table>")
