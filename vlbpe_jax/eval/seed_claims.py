"""The seed's claims over LM seeds: a recorded run of `benchmarks/claims.py` in the demo's report.

The report's first table judges each claim on this run alone (one LM seed: its error bars cover
the test items, not training noise). `benchmarks/claims.py` repeats the LM runs over seeds and
budgets; one such run is recorded in a JSON file (`docs/claims.json`), written by

  python benchmarks/claims.py --config=configs/tiny.py --workdir=W --seeds=0,1,2 \
      --budgets=1,4 --record_out=docs/claims.json --commit=C

and the report shows it right below the claims (section `seed_claims`; `config.claims_record`
names the file, "" = none). The record keeps the config it was made with (`key`: every field of
the data, VQ, BPE and LM stages but those the claims vary or drop, `VARIED`), and the page
compares it with this run's: it says whether the record was made with this run's config and
lists the fields that differ when not, so a stale record is never read as this config's.

  {"config": "configs/tiny.py", "commit": "555cd1d", "finished": "2026-12-05 09:30 UTC",
   "machine": "x86_64 with 2 CPUs", "key": {"config": {...}, "inputs": {}},
   "claims": {"seeds": [0, 1, 2], "budgets": [1, 4], "runs": [...], "stage_steps": {...},
              "text_steps": 50, "summary": {...}, "claims": [...], "command": "..."}}
"""

import copy
import html as html_lib
import math

from vlbpe_jax import fileio
from vlbpe_jax import manifest
from vlbpe_jax.eval import longer_run

FIELDS = longer_run.FIELDS
# The config sections a claims run reads (the LM's runs read data, VQ and BPE outputs).
SECTIONS = ("seed", "data", "vq", "bpe", "lm")
# Fields of those sections that claims.py sets per (budget, seed), or that only V2L's frozen LM
# reads (no run of claims.py trains it): not in the key.
VARIED = ("lm.runs", "lm.seed", "lm.text_phases", "lm.denoise_palettes", "lm.denoise_ns",
          "lm.denoise_shots", "lm.progress")
_CLAIMS_KEYS = ("seeds", "budgets", "runs", "stage_steps", "text_steps", "summary", "claims")
_VERDICTS = {"holds": "holds", "reversed": "does not hold", "not resolved": "inconclusive"}
_SHOWN = (("VQA", "vqa_acc"), ("held-out", "vqa_acc_heldout"),
          ("wrong image", "vqa_acc_wrong_image"), ("count", "vqa_acc_by_type.count"),
          ("colour", "vqa_acc_by_type.color"), ("shape", "vqa_acc_by_type.shape"),
          ("position", "vqa_acc_by_type.position"))


def key(config) -> dict:
  """What a claims run of `config` depends on: the `SECTIONS` fields but `VARIED` (a manifest
  key, compared with `manifest.describe_changes`)."""
  d = copy.deepcopy(manifest.config_dict(config))
  for dotted in VARIED:
    section, field = dotted.split(".")
    if isinstance(d.get(section), dict):
      d[section].pop(field, None)
  return manifest.stage_key(d, [s for s in SECTIONS if s in d], {})


def record(claims_out: dict, pipeline_config, /, **fields) -> dict:
  """The record of a finished `claims.py` run: its result (`claims_out`, as `claims.run`
  returns it; the per-seed values and the Markdown are left out), the key of the config it ran
  (`pipeline_config`) and `fields` (config: the config's name, commit, finished, machine:
  non-empty strings)."""
  prov = longer_run.provenance(fields, "claims record")
  absent = [k for k in _CLAIMS_KEYS if k not in claims_out]
  if absent:
    raise ValueError(f"claims result lacks {absent}: expected what benchmarks/claims.py's run() "
                     f"returns ({list(_CLAIMS_KEYS)})")
  kept = {k: claims_out[k] for k in _CLAIMS_KEYS + ("command",) if k in claims_out}
  return {**prov, "key": key(pipeline_config),
          "claims": fileio.json_safe(kept)}


def read(path: str) -> dict:
  """The record at `path` (absolute, or relative to the repository), checked; a ValueError
  names what is wrong."""
  full = longer_run.resolve(path)
  try:
    rec = fileio.read_json(full, what="claims record")
  except FileNotFoundError:
    raise ValueError(f"config.claims_record={path!r}: no such file ({full}); expected a file "
                     f"written by benchmarks/claims.py --record_out, or \"\"") from None
  bad = longer_run.missing_provenance(rec)
  claims = rec.get("claims")
  if bad or not isinstance(rec.get("key"), dict) or not isinstance(claims, dict):
    raise ValueError(f"claims record {full}: fields {bad or ['key', 'claims']} missing or "
                     f"empty; expected {list(FIELDS) + ['key', 'claims']}")
  absent = [k for k in _CLAIMS_KEYS if k not in claims]
  if absent:
    raise ValueError(f"claims record {full}: claims lack {absent}; expected {list(_CLAIMS_KEYS)}")
  for c in claims["claims"]:
    if c.get("verdict") not in _VERDICTS:
      raise ValueError(f"claims record {full}: verdict {c.get('verdict')!r} of claim "
                       f"{c.get('claim')!r}; expected one of {sorted(_VERDICTS)}")
  return rec


def _stat(s) -> str:
  if not s or s.get("mean") is None or not math.isfinite(s["mean"]):
    return "&ndash;"
  se = s.get("se")
  return f"{100 * s['mean']:.1f}" + ("" if se is None else f" &plusmn; {100 * se:.1f}")


def to_html(rec: dict, config) -> str:
  """Per budget, each run's mean +- SE over seeds; then each claim's difference and verdict;
  and whether the record was made with `config` (the fields that differ when not)."""
  c = rec["claims"]
  changes = manifest.describe_changes(rec["key"], key(config))
  prov = html_lib.escape(f"{rec['config']} at commit {rec['commit']}, finished "
                         f"{rec['finished']} on {rec['machine']}")
  seeds = ", ".join(map(str, c["seeds"]))
  out = [f"<p>The table above judges each claim on this run's one LM seed. This is a recorded "
         f"run of <code>benchmarks/claims.py</code> ({prov}): the Being-VL runs trained with LM "
         f"seeds {html_lib.escape(seeds)} (data, VQ and BPE shared), stage 0 for "
         f"{int(c['text_steps'])} steps, then <code>lm.stage_steps</code> times each budget. "
         "Accuracies in %, mean &plusmn; standard error over seeds. Numbers of that run, not of "
         "this one.</p>"]
  if changes:
    items = "".join(f"<li><code>{html_lib.escape(x)}</code></li>" for x in changes)
    out.append("<p class='stale'><b>Recorded with another config than this run's</b> "
               f"(record &rarr; this run): its verdicts are not about this config.</p>"
               f"<ul class='small'>{items}</ul>")
  else:
    out.append("<p class='small'>Recorded with this run's data, VQ, BPE and LM config (every "
               "field but those the claims vary or drop: the LM seed and runs, and V2L's "
               "continuation of stage 0).</p>")
  for budget, by_run in c["summary"].items():
    steps = tuple(c["stage_steps"].get(budget, ()))
    rows = "".join(
        f"<tr><td>{html_lib.escape(run)}</td><td>{s['vqa_acc'].get('n', '')}</td>"
        + "".join(f"<td>{_stat(s.get(m))}</td>" for _, m in _SHOWN) + "</tr>"
        for run, s in by_run.items())
    out.append(f"<p><b>Budget x{html_lib.escape(str(budget))}</b>: stage steps "
               f"{html_lib.escape(str(steps))}</p><table class='seed_claims_runs'><tr><th>run"
               "</th><th>seeds</th>" + "".join(f"<th>{h}</th>" for h, _ in _SHOWN) + "</tr>"
               + rows + "</table>")
  rows = []
  for cl in c["claims"]:
    word = _VERDICTS[cl["verdict"]]
    diff = "&ndash;" if cl.get("diff") is None else f"{100 * cl['diff']:+.1f}"
    two_se = "" if cl.get("se") is None else f" &plusmn; {200 * cl['se']:.1f}"
    rows.append(f"<tr><td>x{html_lib.escape(str(cl['budget']))}</td>"
                f"<td>{html_lib.escape(cl['claim'])}</td>"
                f"<td>{html_lib.escape(cl['a'])} &minus; {html_lib.escape(cl['b'])}</td>"
                f"<td>{diff}{two_se}</td>"
                f"<td class='verdict {word.replace(' ', '_')}'>{word}</td></tr>")
  out.append("<table id='seed_claims_table'><tr><th>budget</th><th>seed claim</th><th>runs</th>"
             "<th>difference of the means &plusmn; 2 SE (VQA)</th><th>verdict</th></tr>"
             + "".join(rows) + "</table>")
  return "\n".join(out)
