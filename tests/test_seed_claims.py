"""The report's recorded run of benchmarks/claims.py: shown below the claims, keyed by its config."""

import importlib.util
import os
import re

import ml_collections
import pytest

import report_helpers
from test_main import ROOT, load_config
from vlbpe_jax import fileio
from vlbpe_jax import manifest
from vlbpe_jax import train
from vlbpe_jax.eval import seed_claims

_spec = importlib.util.spec_from_file_location(
    "claims", os.path.join(ROOT, "benchmarks", "claims.py"))
claims = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(claims)

FIELDS = dict(config="configs/tiny.py", commit="abc1234", finished="2026-12-05 09:30 UTC",
              machine="x86_64 with 2 CPUs")


def _claims_out(config):
  """A claims.run-shaped result over 3 seeds: full well above single_stage, no_bpe below."""
  per_seed = {"1": {}}
  for s, (full, nobpe, single) in enumerate([(0.50, 0.40, 0.30), (0.52, 0.41, 0.31),
                                             (0.51, 0.53, 0.29)]):
    per_seed["1"][str(s)] = {
        r: {"vqa_acc": v, "vqa_acc_heldout": v / 2, "vqa_acc_wrong_image": 0.2,
            "vqa_acc_by_type.color": v, "vqa_acc_by_type.shape": None}
        for r, v in (("full", full), ("no_bpe", nobpe), ("single_stage", single))}
  runs = ["full", "no_bpe", "single_stage"]
  return {"seeds": [0, 1, 2], "budgets": [1], "runs": runs, "text_steps": 50,
          "stage_steps": {"1": list(config.lm.stage_steps)}, "per_seed": per_seed,
          "command": "python benchmarks/claims.py ...", "markdown": "...",
          **claims.aggregate(per_seed, runs)}


def _write(tmp_path, config, **fields):
  path = str(tmp_path / "claims.json")
  fileio.write_json(path, seed_claims.record(_claims_out(config), config, **{**FIELDS, **fields}))
  return path


def _section(html):
  start = html.index("<h2 id='seed_claims'>")
  return html[start:html.index("<h2", start + 1)]


def test_report_shows_the_record_below_the_claims_with_its_verdicts(tmp_path):
  demo = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  w = str(tmp_path / "w")
  report_helpers.make_workdir(w, stages=("vq", "lm"))
  cfg = demo.copy_and_resolve_references()
  cfg.claims_record, cfg.longer_run = _write(tmp_path, demo), ""
  html = open(train._run_section(cfg, w)).read()
  # Right below this run's claims table, before the curves and the stages.
  at = html.index("<h2 id='seed_claims'>")
  assert html.index("<table id='summary'>") < at < html.index("<h2 id='sections'>")
  sec = _section(html)
  assert "configs/tiny.py at commit abc1234" in sec and "LM seeds 0, 1, 2" in sec
  # full: 51.0 +- 0.6; no_bpe: 44.7 +- 4.3 (the third seed's 0.53); single: 30.0 +- 0.6.
  assert re.search(r"<td>full</td><td>3</td><td>51\.0 &plusmn; 0\.6</td>", sec)
  assert re.search(r"<td>single_stage</td><td>3</td><td>30\.0 &plusmn; 0\.6</td>", sec)
  assert "<td>&ndash;</td>" in sec  # shape: no seed has a value
  rows = re.findall(r"<td>(BPE &gt; no BPE|staging \+ curriculum &gt; single stage)</td>.*?"
                    r"<td class='verdict [a-z_]+'>([a-z ]+)</td>", sec)
  assert dict(rows) == {"BPE &gt; no BPE": "inconclusive",  # +6.3 with 2 SE = 8.4
                        "staging + curriculum &gt; single stage": "holds"}
  assert "<td>+6.3 &plusmn; 8.4</td>" in sec and "<td>+21.0 &plusmn; 1.6</td>" in sec
  assert "Recorded with this run's data, VQ, BPE and LM config" in sec
  assert "another config" not in sec
  # The LM seed and runs are what the claims vary: the same record still matches.
  cfg.lm.seed, cfg.lm.runs = 7, ("full",)
  assert "another config" not in _section(open(train._run_section(cfg, w)).read())
  # Another LM budget: the record is flagged stale and the changed field named.
  cfg.lm.stage_steps = (1, 2, 3)
  sec = _section(open(train._run_section(cfg, w)).read())
  assert "Recorded with another config than this run's" in sec
  assert re.search(r"config lm\.stage_steps: \[40, 40, 80\] -&gt; \[1, 2, 3\]", sec), sec
  # Without a record: no such section.
  cfg.claims_record = ""
  assert "seed_claims" not in open(train._run_section(cfg, w)).read()


def test_a_bad_record_is_refused_before_any_stage_runs(tmp_path):
  demo = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  w = str(tmp_path / "w")
  cfg = ml_collections.ConfigDict({"stages": "data", "recompute": "",
                                   "claims_record": str(tmp_path / "nope.json")})
  with pytest.raises(ValueError, match=r"config.claims_record=.*nope.json.*no such file"):
    train.train_and_evaluate(cfg, w)
  assert not os.path.exists(w)
  rec = fileio.read_json(_write(tmp_path, demo))
  bad = str(tmp_path / "bad.json")
  broken_verdict = {**rec, "claims": {**rec["claims"], "claims": [
      {**rec["claims"]["claims"][0], "verdict": "maybe"}]}}
  for broken, match in [({**rec, "commit": ""}, r"\['commit'\] missing or empty"),
                        ({k: v for k, v in rec.items() if k != "key"}, r"\['key', 'claims'\]"),
                        ({**rec, "claims": {"seeds": [0]}}, r"claims lack \['budgets'"),
                        (broken_verdict, r"verdict 'maybe' of claim 'BPE > no BPE'")]:
    fileio.write_json(bad, broken)
    with pytest.raises(ValueError, match=match):
      seed_claims.read(bad)


def test_record_needs_its_provenance_and_a_claims_result():
  demo = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  out = _claims_out(demo)
  with pytest.raises(ValueError, match=r"missing or empty: \['commit'\]"):
    seed_claims.record(out, demo, **{**FIELDS, "commit": " "})
  with pytest.raises(ValueError, match=r"expected exactly"):
    seed_claims.record(out, demo, **FIELDS, seed="0")
  with pytest.raises(ValueError, match=r"claims result lacks \['summary'"):
    seed_claims.record({k: v for k, v in out.items() if k != "summary"}, demo, **FIELDS)
  rec = seed_claims.record(out, demo, **FIELDS)
  assert "per_seed" not in rec["claims"] and "markdown" not in rec["claims"]


def test_the_demo_shows_a_record_made_with_its_own_config():
  demo = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  rec = seed_claims.read(demo.claims_record)
  changes = manifest.describe_changes(rec["key"], seed_claims.key(demo))
  assert not changes, (
      f"{demo.claims_record} was recorded with another config than the demo's: {changes}. "
      "Rerun benchmarks/claims.py with --record_out (README, 'The seeds' claims') or set "
      "claims_record to \"\" in configs/tiny.py")
  assert rec["config"] == "configs/tiny.py" and len(rec["claims"]["seeds"]) >= 3
  for arg in ("long", "tiny"):  # those show none
    assert load_config(os.path.join(ROOT, "configs", "tiny.py"), arg).claims_record == ""
