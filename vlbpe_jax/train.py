"""The pipeline: data -> VQ -> visual BPE -> unified LM, each stage reading the previous one's files.

Every stage is `run_stage(config, workdir) -> metrics` in its own package (`vlbpe_jax/<x>/
stage.py`), resumes from what `workdir` already holds, and adds its section to the one
report (`workdir/report/index.html`, `metrics.json`). `config.stages` picks which run.
"""

import html
import json
import os
import time

from absl import logging

from vlbpe_jax.bpe import stage as bpe_stage
from vlbpe_jax.data import stage as data_stage
from vlbpe_jax.eval import report
from vlbpe_jax.lm import stage as lm_stage
from vlbpe_jax.vq import stage as vq_stage

# In pipeline order: a stage reads the artifacts of those before it.
STAGES = {
    "data": data_stage.run_stage,
    "vq": vq_stage.run_stage,
    "bpe": bpe_stage.run_stage,
    "lm": lm_stage.run_stage,
}


def parse_stages(spec) -> list[str]:
  """`"data,vq"` (or a sequence) -> stage names in pipeline order; unknown names raise."""
  names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
  unknown = [n for n in names if n not in STAGES]
  if unknown or not names:
    raise ValueError(f"config.stages={spec!r}: unknown or empty; expected a comma-separated "
                     f"subset of {list(STAGES)}")
  return [n for n in STAGES if n in names]


def train_and_evaluate(config, workdir: str) -> str:
  """Runs `config.stages` in order; returns the path of the report's index.html."""
  names = parse_stages(config.stages)
  os.makedirs(workdir, exist_ok=True)
  timings_path = os.path.join(workdir, "stages.json")
  timings = {}
  if os.path.exists(timings_path):
    with open(timings_path) as f:
      timings = json.load(f)
  for name in names:
    logging.info("=== stage %s ===", name)
    t0 = time.perf_counter()
    metrics = STAGES[name](config, workdir)
    seconds = time.perf_counter() - t0
    logging.info("stage %s done in %.1fs: %s", name, seconds, metrics)
    timings[name] = {"seconds": round(seconds, 2), "finished": time.strftime("%F %T")}
    with open(timings_path, "w") as f:
      json.dump(timings, f, indent=1)
  rows = [(n, t["seconds"], t["finished"]) for n, t in timings.items()]
  config_html = f"<pre class='small'>{html.escape(str(config))}</pre>"
  return report.add_section(
      workdir, key="run", title="Run", order=0,
      html=report.table(["stage", "seconds (last run)", "finished"], rows) + config_html)
