"""Can a fresh LM of the demo's shape learn V2L's few-shot classification prompt at all?

V2L's few-shot results are at chance and its text-only control is too (BENCHMARKS.md, "Few-shot
classification"). This probe takes everything else away: a fresh LM (`lm/model.py`, the
variant and field overrides given) trained only on the text-only classification episodes of
`data/icl.py` (the exact layout of the visual prompt, inputs = symbol strings; loss on every
label, or with `--loss_on=decided` only on the labels an earlier example decides and the
query's), plain AdamW (warm-up + cosine, clipping), padded rows of one episode each. Every 100
steps it logs `label_loss` (the mean loss of the last 50 steps over the target tokens: labels,
eos and, in the compact layout, each label's ";") and scores the query's label, teacher-forced
and unconstrained (the arg-max over the whole vocabulary at the label's first token), on 256
held-out 2-way 1-shot and 256 5-way 1-shot episodes. Chance is at most 1/2 and 1/5 (an LM that
picks one of the listed classes at random).

`--induction=F` makes a fraction F of the training rows stage 0's induction episodes instead
(`--induction_words=labels`: over the label words too; `--induction_span`: the repeat is a span
from anywhere in the sequence after filler, `icl.induction_episode(span=True)`), scored
teacher-forced on 256 held-out ones of the same kind (`induction_acc`: the repeat's tokens after
its first). `2way_copies` / `5way_copies`: how often the query's predicted label is one of the
support labels, right or not. `--show` prints what the model predicts after a few texts.

The easiest setting, `--input_len=1 --noise=0`, asks to copy the label of the one support
example whose single symbol is the query's; with `--layout=compact` (no instruction, no
"Input:"/"Output:" headers: "g blue ; k red ; g" -> "blue") that is the induction pattern of
`icl.induction_episode` (the query's symbol, then what followed it before). In that layout the
class list is not in the prompt, so an LM that copies one of the support labels at random
scores 1/way. Needs a workdir whose data stage is done (the tokenizer). Prints one JSON line
per 100 steps.

  .venv/bin/python -m vlbpe_jax.main --config=configs/tiny.py --workdir=/tmp/w \
      --config.stages=data
  .venv/bin/python benchmarks/icl_classify_probe.py --workdir=/tmp/w --steps=600 \
      --input_len=1 --noise=0
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("workdir", "/tmp/w", "A pipeline workdir with the data stage done.")
flags.DEFINE_string("variant", "Ti", "lm/config.py:VARIANTS")
flags.DEFINE_list("model", [], "LMConfig field overrides, name=value, an int where the value "
                  "is one (e.g. depth=3, dtype=float32).")
flags.DEFINE_integer("steps", 600, "Training steps.")
flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
flags.DEFINE_integer("batch", 16, "Episodes per step.")
flags.DEFINE_integer("len", 256, "Row length (episodes longer than this are redrawn).")
flags.DEFINE_float("noise", 0.25, "Per-symbol replacement probability (icl.classification_task).")
flags.DEFINE_integer("input_len", 4, "Symbols per input.")
flags.DEFINE_list("ways", ["2", "3", "5"], "Training episodes' ways.")
flags.DEFINE_list("shots", ["1", "2"], "Training episodes' shots.")
flags.DEFINE_enum("loss_on", "all", ["all", "decided"],
                  "all: every label (icl.classification_episode's targets); decided: only the "
                  "labels an earlier example decides (its class seen before) and the query's.")
flags.DEFINE_float("induction", 0.0,
                   "Fraction of the training rows that are stage 0's induction episodes "
                   "(icl.induction_episode: a symbol sequence, then the same again) instead of "
                   "classification episodes.")
flags.DEFINE_enum("induction_words", "symbols", ["symbols", "labels"],
                  "The induction episodes' words: symbols: icl.SYMBOLS (never a label, as in "
                  "stage 0); labels: the symbols and every colour and shape name.")
flags.DEFINE_bool("induction_span", False, "icl.induction_episode(span=True): the repeat is "
                  "a span from anywhere in the sequence, after random filler.")
flags.DEFINE_enum("layout", "v2l", ["v2l", "compact"],
                  "v2l: the visual prompt's layout (icl.classification_episode); compact: no "
                  "instruction and no headers, each example its input, its label and ' ;'.")
flags.DEFINE_bool("show", False, "At the end, print the top-4 next tokens (with their "
                  "probabilities) after each of SHOW's texts: which earlier token the model copies.")
FLAGS = flags.FLAGS
WARMUP = 20  # steps
# Texts whose next token tells a content match ("find my symbol earlier, copy what followed it")
# from a positional copy ("copy what followed the row's first symbol").
SHOW = ("g blue ; k red ; g", "g blue ; k red ; k", "g blue k red g", "g blue k red k",
        "b red a blue b", "b red a blue a", "a b c d a", "x g blue k red y g",
        "d e g blue k red d e g")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.data import icl  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.data import stage as data_stage  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.lm import config as lm_config  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.lm import model as lm_model  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.v2l import prompts  # pylint: disable=g-import-not-at-top

  if FLAGS.steps <= WARMUP:
    raise ValueError(f"--steps={FLAGS.steps}: expected more than the {WARMUP} warm-up steps")
  tok = data_stage.load_tokenizer(FLAGS.workdir)
  overrides = {k: int(v) if v.lstrip("-").isdigit() else v
               for k, v in (kv.split("=", 1) for kv in FLAGS.model)}
  model = lm_model.LM(lm_config.lm_config(FLAGS.variant, text_vocab=tok.vocab_size,
                                          **overrides))
  ways, shots, length = [int(w) for w in FLAGS.ways], [int(s) for s in FLAGS.shots], FLAGS.len

  induction_words = icl.SYMBOLS + (
      sum(icl.LABEL_SETS.values(), ()) if FLAGS.induction_words == "labels" else ())

  def batch(rng, n, way=None, shot=None, induction=0.0):
    """`n` padded episodes: ids, loss mask, index of the query label's first token, and per
    row the first tokens of its support labels (a `[n, 10]` array padded with -1; induction rows
    have query index 0 and no support labels)."""
    ids = np.full((n, length), tok.pad_id, np.int32)
    mask = np.zeros((n, length), bool)
    query = np.zeros(n, np.int32)
    support = np.full((n, 10), -1, np.int32)
    for i in range(n):
      if rng.random() < induction:
        s, m = icl.episode_ids(tok, icl.induction_episode(
            rng, symbols=induction_words, span=FLAGS.induction_span))
        ids[i, :len(s)], mask[i, :len(s)] = s, m
        continue
      for _ in range(100):
        kw = dict(way=way or int(rng.choice(ways)), shot=shot or int(rng.choice(shots)),
                  label_set=("color", "shape")[int(rng.integers(2))], noise=FLAGS.noise,
                  input_len=FLAGS.input_len)
        t = icl.classification_task(rng, **kw)  # icl.classification_episode's draws
        examples = t["support"] + [(t["query"], t["answer"])]
        seen = [lab in [prev for _, prev in examples[:k]] for k, (_, lab) in enumerate(examples)]
        decided = [FLAGS.loss_on == "all" or d for d in seen[:-1]] + [True]
        if FLAGS.layout == "v2l":
          parts = prompts.classification_parts(t["support"], t["query"], t["classes"],
                                               answer=t["answer"])
          labels = iter(decided)
          targets = tuple(k > 0 and parts[k - 1] == prompts.EXAMPLE_OUT and next(labels)
                          for k in range(len(parts)))
          s, m = icl.episode_ids(tok, icl.Episode(tuple(parts), targets))
        else:
          s, m = [tok.bos_id], [False]
          for (x, label), d in zip(examples, decided):
            x, y = tok.encode(x), tok.encode(label) + tok.encode(";")
            s, m = s + x + y, m + [False] * len(x) + [d] * len(y)
          s = np.asarray(s + [tok.eos_id], np.int32)
          m = np.asarray(m + [True], bool)
        if len(s) <= length:
          break
      else:
        raise ValueError(f"--len={length}: the episodes drawn are all longer")
      ids[i, :len(s)], mask[i, :len(s)] = s, m
      firsts = sorted({tok.encode(lab)[0] for _, lab in t["support"]})
      support[i, :len(firsts)] = firsts
      j = np.flatnonzero(m[:-1])[-1]  # the query's label: the last target run before eos
      while j > 0 and m[j - 1]:
        j -= 1
      query[i] = j
    return ids, mask, query, support

  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32))["params"]
  schedule = optax.warmup_cosine_decay_schedule(0, FLAGS.lr, WARMUP, FLAGS.steps, FLAGS.lr * 0.1)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95,
                                                                weight_decay=0.0))
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, ids, mask):
    def loss_fn(p):
      logits = model.apply({"params": p}, ids[:, :-1])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
      w = mask[:, 1:].astype(jnp.float32)
      return (ce * w).sum() / w.sum()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  predict = jax.jit(lambda p, ids: jnp.argmax(model.apply({"params": p}, ids), -1))
  held_out = {way: batch(np.random.default_rng(1000 + way), 256, way=way, shot=1)
              for way in (2, 5)}
  ind_ids, ind_mask = batch(np.random.default_rng(999), 256, induction=1.0)[:2]
  # Induction is scored on the repeat's tokens after its first (which nothing decides), eos
  # excluded: the prediction at i - 1 of the token at i for each such i.
  ind_mask = ind_mask & np.roll(ind_mask, 1, axis=1)
  ind_mask[np.arange(len(ind_mask)), ind_mask.shape[1] - 1 - np.argmax(ind_mask[:, ::-1], 1)] = 0
  rng, t0, losses = np.random.default_rng(0), time.time(), []
  for s in range(1, FLAGS.steps + 1):
    ids, mask, _, _ = batch(rng, FLAGS.batch, induction=FLAGS.induction)
    params, opt_state, loss = step(params, opt_state, jnp.asarray(ids), jnp.asarray(mask))
    losses.append(float(loss))
    if s % 100 == 0 or s == FLAGS.steps:
      out = {"step": s, "label_loss": round(float(np.mean(losses[-50:])), 3)}
      for way, (ids, _, q, sup) in held_out.items():
        pred = np.asarray(predict(params, jnp.asarray(ids)))
        rows = np.arange(len(q))
        out[f"{way}way_1shot"] = round(float(np.mean(pred[rows, q - 1] == ids[rows, q])), 3)
        # How often the query's predicted label is one of the support labels (right or not).
        out[f"{way}way_copies"] = round(float(np.mean(
            (pred[rows, q - 1][:, None] == sup).any(1))), 3)
      pred = np.asarray(predict(params, jnp.asarray(ind_ids)))
      hit = pred[:, :-1] == ind_ids[:, 1:]
      out["induction_acc"] = round(float(hit[ind_mask[:, 1:]].mean()), 3)
      out.update(seconds=round(time.time() - t0, 1), variant=FLAGS.variant, model=FLAGS.model,
                 noise=FLAGS.noise, input_len=FLAGS.input_len, ways=ways, shots=shots,
                 layout=FLAGS.layout, loss_on=FLAGS.loss_on,
                 induction=FLAGS.induction, induction_words=FLAGS.induction_words,
                 induction_span=FLAGS.induction_span)
      print(json.dumps(out), flush=True)
  for text in SHOW if FLAGS.show else ():
    ids = jnp.asarray([[tok.bos_id] + tok.encode(text)])
    p = np.asarray(jax.nn.softmax(model.apply({"params": params}, ids)[0, -1].astype(jnp.float32)))
    top = np.argsort(-p)[:4]
    print(json.dumps({"text": text, "next": [[tok.id_to_piece(int(i)), round(float(p[i]), 2)]
                                             for i in top]}), flush=True)


if __name__ == "__main__":
  app.run(main)
