"""benchmarks/claims.py: mean +- SE over seeds, verdicts only beyond the error bars, end to end."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from test_main import ROOT, load_config
from vlbpe_jax.eval import seed_claims

_spec = importlib.util.spec_from_file_location(
    "claims", os.path.join(ROOT, "benchmarks", "claims.py"))
claims = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(claims)


def test_stats_are_mean_and_standard_error_with_ddof_1():
  s = claims.stats([0.5, 0.7, None, 0.6])
  assert s["n"] == 3 and s["mean"] == pytest.approx(0.6)
  assert s["se"] == pytest.approx(np.std([0.5, 0.7, 0.6], ddof=1) / math.sqrt(3))
  assert claims.stats([0.4]) == {"mean": 0.4, "se": None, "n": 1}
  assert claims.stats([None]) == {"mean": None, "se": None, "n": 0}


@pytest.mark.parametrize("a,b,want", [
    ([0.60, 0.62, 0.64], [0.40, 0.42, 0.44], "holds"),  # +20 points, combined SE 1.6
    ([0.40, 0.42, 0.44], [0.60, 0.62, 0.64], "reversed"),
    ([0.50, 0.60, 0.70], [0.45, 0.55, 0.65], "not resolved"),  # +5 points inside 2 SE = 16
    ([0.60, 0.60], [0.60, 0.60], "not resolved"),  # equal, no spread
    ([0.90], [0.10], "not resolved"),  # one seed: no error bar, no direction
])
def test_verdict_holds_only_beyond_two_combined_standard_errors(a, b, want):
  v = claims.verdict(claims.stats(a), claims.stats(b))
  assert v["verdict"] == want
  assert v["diff"] == pytest.approx(np.mean(a) - np.mean(b))


def test_aggregate_evaluates_the_claims_whose_runs_were_trained():
  per_seed = {"1": {str(s): {"full": {"vqa_acc": 0.5 + 0.01 * s},
                             "no_bpe": {"vqa_acc": 0.3 + 0.02 * s}} for s in range(3)}}
  out = claims.aggregate(per_seed, ["full", "no_bpe"])
  assert [c["claim"] for c in out["claims"]] == ["BPE > no BPE"]
  assert out["claims"][0]["verdict"] == "holds"
  assert out["summary"]["1"]["full"]["vqa_acc"]["mean"] == pytest.approx(0.51)
  assert out["summary"]["1"]["full"]["vqa_acc_heldout"]["n"] == 0  # never reported: missing
  table = claims.markdown({"seeds": [0, 1, 2], "text_steps": 2, "stage_steps": {"1": [2, 2, 2]},
                           **out})
  assert "| full | 3 | 51.0 ± 0.6 | - |" in table
  assert "| x1 | BPE > no BPE | full - no_bpe | +19.0 | 2.6 | **holds** |" in table


def test_bad_arguments_are_refused_naming_them(tmp_path):
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")
  for kw, match in [(dict(seeds=[]), "--seeds"), (dict(budgets=[0]), "--budgets"),
                    (dict(runs=["full", "staged"]), "--runs")]:
    args = {**dict(seeds=[0], budgets=[1], runs=["full"]), **kw}
    with pytest.raises(ValueError, match=match):
      claims.run(config, str(tmp_path), **args)
  assert not os.listdir(tmp_path)


def test_lm_config_scales_the_stages_and_sets_the_seed():
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"), None)  # the demo's
  c = claims.lm_config(config, seed=2, budget=4, runs=["full", "no_bpe"])
  assert c.stages == "text,lm" and c.lm.seed == 2 and c.lm.runs == ("full", "no_bpe")
  assert c.lm.stage_steps == tuple(4 * n for n in config.lm.stage_steps)
  assert c.lm.text_steps == config.lm.text_steps
  assert config.lm.seed == -1 and config.lm.runs != c.lm.runs  # the caller's config as it was


@pytest.mark.slow
def test_claims_on_the_tiny_config_match_the_per_seed_metrics(tmp_path):
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")
  config.vq.disc_weight = 0.0  # no discriminator to compile: the codes only need to exist
  workdir = str(tmp_path)
  runs = ["full", "curriculum_no_staging"]
  out = claims.run(config, workdir, seeds=[0, 1], budgets=[1], runs=runs)
  with open(os.path.join(workdir, "claims.json")) as f:
    assert json.load(f) == json.loads(json.dumps(out))
  with open(os.path.join(workdir, "claims.md")) as f:
    table = f.read()
  assert table == out["markdown"]
  assert not os.path.exists(os.path.join(workdir, "lm"))  # only data/vq/bpe in the base
  losses = []
  for seed in (0, 1):
    wd = claims.seed_workdir(workdir, 1, seed)
    assert os.path.islink(os.path.join(wd, "vq"))
    with open(os.path.join(wd, "lm", "full", "metrics.jsonl")) as f:
      losses.append(json.loads(f.readline())["train/loss"])
  assert losses[0] != losses[1]  # lm.seed changed the LM's init and data order
  # Mean and SE recomputed from each seed's stored metrics.
  per_seed = []
  for seed in (0, 1):
    with open(os.path.join(claims.seed_workdir(workdir, 1, seed), "report",
                           "metrics.json")) as f:
      per_seed.append(json.load(f))
  for run in runs:
    for name, key in claims.METRICS.items():
      values = [m[key.format(run=run)] for m in per_seed if key.format(run=run) in m]
      got = out["summary"]["1"][run][name]
      assert got["n"] == len(values), (run, name)
      if values:
        assert got["mean"] == pytest.approx(np.mean(values))
      if len(values) == 2:
        assert got["se"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(2))
    assert f"| {run} | 2 | {claims.fmt(out['summary']['1'][run]['vqa_acc'])} |" in table
  (claim,) = out["claims"]
  assert claim["claim"] == "staging + curriculum > curriculum alone"
  a, b = (out["summary"]["1"][r]["vqa_acc"] for r in runs)
  assert claim == {"budget": "1", "claim": claim["claim"], "a": runs[0], "b": runs[1],
                   "metric": "vqa_acc", **claims.verdict(a, b)}
  assert f"**{claim['verdict']}**" in table
  # A rerun finds every workdir done: the same numbers.
  again = claims.run(config, workdir, seeds=[0, 1], budgets=[1], runs=runs)
  assert again["summary"] == out["summary"]
  # The command line with --record_out, over the finished workdir: trains nothing, writes the
  # record the demo's report shows, keyed by the config it ran.
  rec_path = str(tmp_path / "record.json")
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "claims.py"),
         "--config=" + os.path.join(ROOT, "configs", "tiny.py") + ":tiny",
         "--config.vq.disc_weight=0.0", f"--workdir={workdir}", "--seeds=0,1", "--budgets=1",
         "--runs=" + ",".join(runs), f"--record_out={rec_path}"]
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert res.returncode != 0 and "needs --commit" in res.stderr
  res = subprocess.run(cmd + ["--commit=abc1234"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Training" not in res.stderr and "lm: run" not in res.stderr  # nothing retrained
  rec = seed_claims.read(rec_path)
  assert rec["commit"] == "abc1234" and rec["config"] == "configs/tiny.py:tiny"
  assert rec["claims"]["summary"] == json.loads(json.dumps(out["summary"]))
  assert rec["key"] == seed_claims.key(config)
