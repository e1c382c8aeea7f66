"""The report's "What a longer run gives": a recorded run of configs/tiny.py:long beside this
run."""

import os
import re

import ml_collections
import pytest

import report_helpers
from test_main import ROOT, load_config
from vlbpe_jax import fileio
from vlbpe_jax import train
from vlbpe_jax.eval import longer_run
from vlbpe_jax.eval import report

FIELDS = dict(config="configs/tiny.py:long", commit="abc1234", finished="2026-12-04 15:20 UTC",
              machine="x86_64 with 2 CPUs")


def _record(tmp_path, metrics=None):
  metrics = metrics or {"lm.vqa_acc.full": 0.55, "vq.psnr_db": 31.25, "time_s.vq": 477.0,
                        "lm.some_other_number": 3.0}
  path = str(tmp_path / "longer.json")
  fileio.write_json(path, longer_run.record(metrics, **FIELDS))
  return path


def _row(html, key):
  m = re.search(r"<tr><td>[^<]*<code class='small'>" + re.escape(key) + r"</code></td>"
                r"<td>([^<]*)</td><td>([^<]*)</td></tr>", html)
  assert m, f"no row for {key}"
  return m.groups()


def test_run_section_shows_this_run_beside_the_longer_run(tmp_path):
  w = str(tmp_path / "w")
  report_helpers.make_workdir(w, stages=("vq", "lm"))  # vq.psnr_db 30.0, lm full 0.60
  path = _record(tmp_path)
  index = train._run_section(ml_collections.ConfigDict({"longer_run": path}), w)
  html = open(index).read()
  # Right below the claims table, before the curves and the stages.
  at = html.index("<h2 id='longer_run'>What a longer run gives</h2>")
  assert html.index("<table id='summary'>") < at < html.index("<h2 id='sections'>")
  assert "<a href='#longer_run'>" not in html  # not listed among the stages
  assert _row(html, "lm.vqa_acc.full") == ("60.0%", "55.0%")
  assert _row(html, "vq.psnr_db") == ("30.0", "31.2")
  assert _row(html, "time_s.vq") == ("&ndash;", "477")  # no manifest here: not timed
  assert _row(html, "lm.vqa_acc.no_bpe") == ("40.0%", "&ndash;")  # only this run has it
  assert "lm.some_other_number" not in html  # only headline numbers are recorded
  assert "configs/tiny.py:long at commit abc1234" in html
  # Without a record (the tiny and long configs): no such table, the rest unchanged.
  plain = open(train._run_section(ml_collections.ConfigDict({"longer_run": ""}), w)).read()
  assert "What a longer run gives" not in plain and "<h2 id='run'>Run</h2>" in plain
  # The record adds no metric: metrics.json holds this run's numbers only.
  assert report.section_metrics(w, "longer_run") is None
  train._run_section(ml_collections.ConfigDict({"longer_run": path}), w)
  assert report.section_metrics(w, "longer_run") == {}
  assert report.read_metrics(w)["lm.vqa_acc.full"] == 0.60


def test_a_bad_record_is_refused_before_any_stage_runs(tmp_path):
  w = str(tmp_path / "w")
  cfg = ml_collections.ConfigDict({"stages": "data", "recompute": "",
                                   "longer_run": str(tmp_path / "nope.json")})
  with pytest.raises(ValueError, match=r"config.longer_run=.*nope.json.*no such file"):
    train.train_and_evaluate(cfg, w)
  assert not os.path.exists(w)
  bad = str(tmp_path / "bad.json")
  rec = longer_run.record({"lm.vqa_acc.full": 0.5}, **FIELDS)
  for broken, match in [({**rec, "commit": ""}, r"\['commit'\] missing or empty"),
                        ({**rec, "metrics": {"lm.vqa_acc.full": None}},
                         r"lm.vqa_acc.full=None; expected a finite number"),
                        ({k: v for k, v in rec.items() if k != "metrics"}, r"\['metrics'\]")]:
    fileio.write_json(bad, broken)
    with pytest.raises(ValueError, match=match):
      longer_run.read(bad)


def test_record_needs_its_provenance_and_a_finished_run():
  with pytest.raises(ValueError, match=r"missing or empty: \['commit'\]"):
    longer_run.record({"lm.vqa_acc.full": 0.5}, **{**FIELDS, "commit": " "})
  with pytest.raises(ValueError, match=r"expected exactly"):
    longer_run.record({"lm.vqa_acc.full": 0.5}, **FIELDS, seed="0")
  with pytest.raises(ValueError, match=r"no headline number of the lm stage"):
    longer_run.record({"vq.psnr_db": 30.0}, **FIELDS)


def test_relative_paths_resolve_against_the_repository():
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  assert longer_run.resolve("docs/x.json") == os.path.join(here, "docs/x.json")
  assert longer_run.resolve("/abs/x.json") == "/abs/x.json"


def test_the_demo_compares_with_a_committed_run_of_its_long_variant():
  demo = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  rec = longer_run.read(demo.longer_run)
  assert rec["config"] == "configs/tiny.py:long"
  for arg in ("long", "tiny"):  # those compare with nothing
    assert load_config(os.path.join(ROOT, "configs", "tiny.py"), arg).longer_run == ""
