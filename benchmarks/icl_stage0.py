"""What limits V2L's few-shot results: the frozen text LM's own in-context ability.

Trains stage 0 (the text-only LM, `lm/train.py:pretrain_text`) on a copy of a pipeline
workdir's data and tokenizer with `--steps` steps and `--tasks` (comma-separated stage-0 tasks,
e.g. `icl` alone or the demo's mix), then scores the text-only few-shot control of the V2L
stage (`v2l/fewshot.text_rows`: symbol -> shape-label episodes, constrained decoding) on 2-way
and 5-way 1-shot, and the LM's teacher-forced accuracy on the target half of 64 held-out
`induction` and `copy` episodes (chance ~1/36: is there an induction head?) and on the query's
clean output of 64 `denoise` episodes at n = 2 and at n = 16 (the restoration prompt, 10
examples, on random local-vocabulary ids; chance ~1/135, a consensus copier ~1). `--kinds`
restricts the `icl` task's episodes to some of `data/icl.KINDS` (for this script only: it
rebinds `icl.sample_episode`, which the data pipeline calls). Prints one JSON line per run.

  .venv/bin/python benchmarks/icl_stage0.py --config=configs/tiny.py --workdir=runs/demo \
      --out=/tmp/icl --steps=300,800 --tasks=icl --kinds=induction

  .venv/bin/python benchmarks/icl_stage0.py --config=configs/tiny.py --workdir=runs/demo \
      --out=/tmp/icl \\
      --steps=200,1000 --tasks=caption,attributes,vqa,dialogue,icl,icl
"""

import functools
import json
import os
import shutil
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("workdir", "runs/demo", "A pipeline workdir with the data stage done.")
flags.DEFINE_string("out", "/tmp/icl_stage0", "Scratch directory (one subdir per run).")
flags.DEFINE_list("steps", ["200", "1000"], "Stage-0 steps per run.")
flags.DEFINE_list("tasks", ["caption", "attributes", "vqa", "dialogue", "icl", "icl"],
                  "Stage-0 task mix.")
flags.DEFINE_integer("episodes", 50, "Text-only episodes per setting.")
flags.DEFINE_list("kinds", [], "Episode kinds of the `icl` task (data/icl.KINDS); empty: all.")


def episode_accuracy(lm, kind: str, num: int = 64, seed: int = 123) -> float:
  """Teacher-forced next-token accuracy on the target parts of `num` held-out episodes
  (`denoise`: on the query's clean output only, the m ids before eos)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.data import icl  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  if kind.startswith("denoise"):  # "denoise_n2" / "denoise_n16": the protocol's 10 examples
    seqs = []
    for _ in range(num):
      s, m = icl.denoise_ids(lm.tok, rng, ns=(int(kind[len("denoise_n"):]),), shots=(10,))
      seqs.append((s, np.arange(len(s)) >= len(s) - 3))  # the m = 2 outputs and eos
  else:
    seqs = [icl.episode_ids(lm.tok, icl.sample_episode(rng, kinds=(kind,)))
            for _ in range(num)]
  ids = np.full((num, max(len(s) for s, _ in seqs)), lm.tok.pad_id, np.int32)
  target = np.zeros(ids.shape, bool)
  for i, (s, m) in enumerate(seqs):
    ids[i, :len(s)], target[i, :len(s)] = s, m
  pred = np.asarray(jnp.argmax(lm.model.apply({"params": lm.params}, jnp.asarray(ids)), -1))
  scored = target[:, 1:] & (ids[:, 1:] != lm.tok.eos_id)  # the target parts, not the eos
  return float(np.mean((pred[:, :-1] == ids[:, 1:])[scored]))


def run(steps: int, tasks) -> dict:
  from vlbpe_jax.data import stage as data_stage  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.lm import train as lm_train  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.v2l import fewshot  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.v2l import train as v2l_train  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.data import icl  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  kinds = tuple(flags.FLAGS.kinds)
  if kinds:
    icl.sample_episode = functools.partial(icl.sample_episode, kinds=kinds)
  config.lm.text_steps = steps
  config.lm.text_tasks = tuple(tasks)
  config.lm.progress = False
  w = os.path.join(flags.FLAGS.out, f"steps{steps}_{'-'.join(tasks)}"
                   + (f"_{'-'.join(kinds)}" if kinds else ""))
  os.makedirs(w, exist_ok=True)
  for d in ("data", "tokenizer"):
    if not os.path.exists(os.path.join(w, d)):
      shutil.copytree(os.path.join(flags.FLAGS.workdir, d), os.path.join(w, d))
  tok = data_stage.load_tokenizer(w)
  source = data_stage.data_source(config, w, "train")
  mesh = lm_train.make_mesh(config)
  t0 = time.perf_counter()
  lm_train.pretrain_text(config, w, tok, source, mesh)
  if lm_train.text_phases(config):  # --config.lm.text_phases: V2L's LM continues stage 0
    lm_train.pretrain_icl(config, w, tok, source, mesh)
  seconds = time.perf_counter() - t0
  lm = v2l_train.load_text_lm(config, w, mesh)
  out = {"steps": steps, "tasks": list(tasks), "kinds": list(kinds) or list(icl.KINDS),
         "train_seconds": round(seconds, 1),
         **{f"teacher_forced.{k}": round(episode_accuracy(lm, k), 3)
            for k in ("induction", "copy", "denoise_n2", "denoise_n16")}}
  for way in (2, 5):
    rows = fewshot.text_rows(lm, way=way, shot=1, num=flags.FLAGS.episodes,
                             seed=int(config.seed), batch_size=64)
    out[f"text_only.{way}way_1shot"] = fewshot.accuracy(rows)
  return out


def main(argv):
  del argv
  for steps in flags.FLAGS.steps:
    print(json.dumps(run(int(steps), flags.FLAGS.tasks)), flush=True)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/tiny.py).",
                                  lock_config=False)
  flags.mark_flags_as_required(["config"])
  app.run(main)
