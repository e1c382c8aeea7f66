"""How many steps does V2L's frozen LM need to form the content match? One text_icl phase alone.

BENCHMARKS.md, "Few-shot classification": span episodes teach the demo's LM the match an
in-context classifier needs, after a phase change (the loss drops, the span's tokens after its
first become right) that came at ~1000-2000 steps, past the demo's budget. This trains only
what that needs: stage 0 (the `text` stage, the demo config's, trained once into WORKDIR/text)
continued by `lm.text_phases` = one phase of TASK for STEPS steps at LR (its own warm-up +
cosine, as the pipeline runs it; `train.pretrain_icl`, the same batches as the pipeline's), in
`WORKDIR/text_icl`, then scores 256 held-out `icl.span_induction_episode`s teacher-forced
(`span_acc`: the span's tokens after its first, eos excluded; the same episodes for every
TASK). The loss curve is in `WORKDIR/text_icl/metrics.jsonl` (printed every 100 steps).

  python benchmarks/icl_phase_probe.py --config=configs/tiny.py --source=W \\
      --workdir=/tmp/p/suffix --task=suffix_induction --steps=1000 --lr=1e-3

W: a pipeline workdir of the demo config with the data stage done (its data and tokenizer are
linked, not copied). KV_HEADS-style model changes: --kv_heads.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config_flags.DEFINE_config_file("config", None, "Config file (configs/tiny.py: the demo's).")
flags.DEFINE_string("source", None, "A demo workdir with the data stage done.")
flags.DEFINE_string("workdir", None, "This probe's workdir (created).")
flags.DEFINE_enum("task", "suffix_induction", ["span_induction", "suffix_induction", "induction"],
                  "The phase's pipeline task.")
flags.DEFINE_integer("steps", 1000, "The phase's steps (its cosine's length).")
flags.DEFINE_float("lr", 1e-3, "The phase's peak LR.")
flags.DEFINE_integer("kv_heads", 0, "lm.model.num_kv_heads (0: the demo's).")
flags.DEFINE_integer("phase_seq_len", 0, "The phase's row length (the optional 4th element "
                     "of an lm.text_phases entry; 0: lm.seq_len); stage 0 keeps lm.seq_len.")
flags.mark_flags_as_required(["config", "source", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vlbpe_jax import parallel  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.data import icl  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.data import stage as data_stage  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.lm import train  # pylint: disable=g-import-not-at-top

  c = FLAGS.config
  c.lm.text_phases = ((FLAGS.steps, (FLAGS.task,), FLAGS.lr) +
                      ((FLAGS.phase_seq_len,) if FLAGS.phase_seq_len else ()),)
  c.lm.progress = False
  if FLAGS.kv_heads:
    c.lm.model.num_kv_heads = FLAGS.kv_heads
  w = FLAGS.workdir
  os.makedirs(w, exist_ok=True)
  for d in ("data", "tokenizer"):
    if not os.path.exists(os.path.join(w, d)):
      os.symlink(os.path.join(os.path.abspath(FLAGS.source), d), os.path.join(w, d))

  jax.config.update("jax_threefry_partitionable", True)
  mesh = parallel.mesh_from_config(c.mesh, batch_size=c.lm.batch_size)
  tok = data_stage.load_tokenizer(w)
  source = tfds_builders.data_source(data_stage.build_dataset(c, w), "train")
  train.pretrain_text(c, w, tok, source, mesh)
  t0 = time.time()
  params = jax.device_get(train.pretrain_icl(c, w, tok, source, mesh))
  seconds = time.time() - t0  # the phase (with its compilations), when it ran here
  with open(os.path.join(train.icl_dir(w), "metrics.jsonl")) as f:
    for row in map(json.loads, f):
      if row["step"] % 100 == 0:
        print(json.dumps({"step": row["step"], "loss": round(row["train/loss"], 3),
                          "token_acc": round(row["train/token_acc"], 3)}))

  model = train.make_model(c, tok)
  rng = np.random.default_rng(999)
  episodes = [icl.induction_episode(rng, symbols=icl.SPAN_SYMBOLS, span=True) for _ in range(256)]
  ids = np.full((len(episodes), 64), tok.pad_id, np.int32)
  mask = np.zeros(ids.shape, bool)
  for i, e in enumerate(episodes):
    s, m = icl.episode_ids(tok, e)
    ids[i, :len(s)], mask[i, :len(s)] = s, m
  scored = mask & np.roll(mask, 1, axis=1)  # the span's tokens after its first...
  scored[np.arange(len(ids)), ids.shape[1] - 1 - np.argmax(mask[:, ::-1], 1)] = False  # no eos
  pred = np.asarray(model.apply({"params": params}, ids).argmax(-1))
  acc = float((pred[:, :-1] == ids[:, 1:])[scored[:, 1:]].mean())
  print(json.dumps({"task": FLAGS.task, "steps": FLAGS.steps, "lr": FLAGS.lr,
                    "kv_heads": FLAGS.kv_heads, "phase_seq_len": FLAGS.phase_seq_len,
                    "phase_s": round(seconds, 1), "span_acc": round(acc, 3)}))


if __name__ == "__main__":
  app.run(main)
