"""V2L's few-shot and restoration figures after one more text phase of its frozen LM.

BENCHMARKS.md, "Few-shot classification": after `:long`'s suffix-induction phase the frozen LM
copies the label of a support image whose global tokens match the query's, but reads the
match as a token and its neighbour, not as the set of the image's 5 tokens (colour 5-way 1-shot
33-36% against the token-overlap control's 94%). This continues SOURCE's trained V2L LM
(`text_icl`, every phase of its config done) by one more phase of TASKS for STEPS steps at
LR (its own warm-up + cosine, Adam's state migrated as at a phase boundary of `pretrain_icl`,
the pipeline's batches), then scores it on SOURCE's trained V2L tokenizer **and SOURCE's
codebooks**: the same global and local tokens for every row, only the LM reading them differs
(a pipeline run with the new phase would also rebuild the global entries, which the LM's
completions propose). Few-shot classification by colour and by shape (2-way and 5-way 1-shot,
`--episodes` each, with the text-only and token-overlap controls) and restoration (frozen LM
and majority-vote control, `v2l.restore_images` test images), as the v2l stage scores them.
`--steps=0` scores SOURCE's own LM (the baseline row). One JSON line at the end.

  python benchmarks/v2l_lm_continue.py --config=configs/tiny.py:long \\
      --source=/tmp/long/runs/long --workdir=/tmp/cont/match --tasks=match_classify \\
      --steps=500 --lr=1e-3

WORKDIR gets links to SOURCE's data, tokenizer, text, clip and v2l (read only) and its own
`text_icl`; SOURCE is not written.
"""

import functools
import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config_flags.DEFINE_config_file("config", None, "SOURCE's config (configs/tiny.py:long).")
flags.DEFINE_string("source", None,
                    "A pipeline workdir whose text_icl and v2l stages are done.")
flags.DEFINE_string("workdir", None, "This probe's workdir (created).")
flags.DEFINE_list("tasks", ["match_classify"], "The phase's pipeline tasks (text-only).")
flags.DEFINE_integer("steps", 500, "The phase's steps (0: score SOURCE's LM).")
flags.DEFINE_float("lr", 1e-3, "The phase's peak LR.")
flags.DEFINE_integer("episodes", 200, "Few-shot episodes per setting.")
flags.DEFINE_bool("restoration", True, "Score restoration too.")
flags.DEFINE_float("match_noise", 0.25, "The match_classify episodes' noise (its default: 0.25).")
flags.DEFINE_bool("match_shuffle", True, "The match_classify episodes' shuffle (default True).")
flags.mark_flags_as_required(["config", "source", "workdir"])
FLAGS = flags.FLAGS


def continue_lm(config, source, w):
  """SOURCE's `text_icl` state continued by the phase into `w/text_icl`."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlbpe_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vlbpe_jax import parallel  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.data import stage as data_stage  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.lm import train  # pylint: disable=g-import-not-at-top

  mesh = parallel.mesh_from_config(config.mesh, batch_size=config.lm.batch_size)
  tok = data_stage.load_tokenizer(w)
  source_data = tfds_builders.data_source(data_stage.build_dataset(config, w), "train")
  done = train.plan_of(config, "text") + train.plan_of(config, "text_icl")
  trainer = train.Trainer(config, train.make_model(config, tok), mesh)
  state = checkpoint.restore_latest(os.path.join(train.icl_dir(source), "ckpt"),
                                    trainer.abstract_state(done[-1]), what="V2L LM",
                                    hint="run the pipeline on SOURCE to its v2l stage")
  at = int(jax.device_get(state["step"]))
  if at != sum(p.steps for p in done):
    raise ValueError(f"SOURCE's text_icl is at step {at}: expected its last, "
                     f"{sum(p.steps for p in done)}")
  # The done steps as one phase with the last one's optimizer (what the state holds), then
  # the new phase: run_plan migrates Adam's state at the boundary, as pretrain_icl does.
  last = done[-1]
  plan = [train.Phase(3, at, last.tasks, last.lr, last.steps),
          train.Phase(3, FLAGS.steps, tuple(FLAGS.tasks), FLAGS.lr)]
  t0 = time.time()
  train.run_plan(config, train.icl_dir(w), trainer, plan,
                 train.iterator_fn(config, tok, source_data, None), init_state=lambda: state,
                 name="text_icl+", must_match=train.ICL_MUST_MATCH)
  return time.time() - t0


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.v2l import fewshot  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.v2l import restore  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.v2l import stage  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.v2l import train as v2l_train  # pylint: disable=g-import-not-at-top

  from vlbpe_jax.data import icl  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_threefry_partitionable", True)
  # The episodes' settings for this process (format_example looks the function up per call).
  icl.match_classification_episode = functools.partial(
      icl.match_classification_episode, noise=FLAGS.match_noise, shuffle=FLAGS.match_shuffle)
  c = FLAGS.config
  c.lm.progress = False
  c.v2l.fewshot_episodes = FLAGS.episodes
  source, w = os.path.abspath(FLAGS.source), FLAGS.workdir
  os.makedirs(w, exist_ok=True)
  for d in ("data", "tokenizer", "clip", "v2l", "text"):
    if not os.path.lexists(os.path.join(w, d)):
      os.symlink(os.path.join(source, d), os.path.join(w, d))
  out = {"tasks": FLAGS.tasks, "steps": FLAGS.steps, "lr": FLAGS.lr, "episodes": FLAGS.episodes,
         "match_noise": FLAGS.match_noise, "match_shuffle": FLAGS.match_shuffle}
  if FLAGS.steps:
    out["train_s"] = round(continue_lm(c, source, w), 1)
  elif not os.path.lexists(os.path.join(w, "text_icl")):
    os.symlink(os.path.join(source, "text_icl"), os.path.join(w, "text_icl"))

  t0 = time.time()
  ctx = v2l_train.load_context(c, w)  # SOURCE's codebooks (the key is SOURCE config's)
  params = v2l_train.restore_state(ctx.s)["params"]
  ids = stage._ids_fn(ctx, params, int(c.v2l.fewshot_global), False)  # pylint: disable=protected-access
  for attribute in ("color", "shape"):
    for way in (2, 5):
      r = stage._classify(ctx, ids, way, 1, attribute)  # pylint: disable=protected-access
      for kind in ("image", "text", "overlap"):
        out[f"{attribute}.{way}way_1shot.{kind}"] = round(fewshot.accuracy(r[kind]), 3)
  if FLAGS.restoration:
    kw = dict(num=int(c.v2l.restore_images), seed=int(c.seed))
    for predictor in ("lm", "majority"):
      for t, r in restore.run(ctx, params, predictor=predictor, **kw).items():
        out[f"restore.{t}.{predictor}"] = round(float(r["gain_db"]), 2)
  out["eval_s"] = round(time.time() - t0, 1)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
