"""Pipeline stage `lm`: the unified model's staged training and its ablations, with a report.

On the same budget (steps, batch, sequence length) it trains, from one text-pretrained model
(stage 0, also evaluated image-blind as a baseline):
  full                   visual BPE tokens, stages 1 -> 2 -> 3 with the curriculum
  no_bpe                 raw VQ codes as the visual tokens, same stages and curriculum
  single_stage           BPE tokens, all weights from the start, every stage's data mixed
  staged_no_curriculum   BPE tokens, stages 1 -> 2 -> 3, each on every stage's data mixed
  curriculum_no_staging  BPE tokens, the curriculum's phases, all weights from the start
(the last two are opt-in via `lm.runs`; `train.plan_of` has the plans) and evaluates each on
the test split (VQA exact match, all / on the questions about a held-out composition,
`evaluate.heldout_question`, with its standard error; caption attribute precision/recall;
example dialogues; the separation of its text and visual embedding rows, `embeddings.py`).
Each run's results go to
`W/lm/<run>/result.json`, keyed by the config fields that made it (`lm.seed` among them, as
`manifest.config_dict` shows it); a run with a result is skipped, a run with checkpoints
resumes. Reads `config.lm.*`, `config.seed` (via `train.lm_seed`), `config.mesh`,
`config.data.*`.
"""

import collections
import html
import math
import os
import time

from absl import logging
import jax
import numpy as np

from vlbpe_jax import fileio
from vlbpe_jax import loop
from vlbpe_jax import manifest
from vlbpe_jax import summary
from vlbpe_jax.data import pipeline
from vlbpe_jax.data import shapes
from vlbpe_jax.data import stage as data_stage
from vlbpe_jax.data import text_tokenizer
from vlbpe_jax.data import tfds_builders
from vlbpe_jax.eval import report
from vlbpe_jax.lm import embeddings
from vlbpe_jax.lm import evaluate
from vlbpe_jax.lm import sequences
from vlbpe_jax.lm import train

KIND = {"full": "bpe", "no_bpe": "vq", "single_stage": "bpe", "staged_no_curriculum": "bpe",
        "curriculum_no_staging": "bpe"}
LABEL = {"full": "full (BPE + 3 stages + curriculum)", "no_bpe": "no BPE (raw VQ codes)",
         "single_stage": "single stage (all weights, data mixed)",
         "staged_no_curriculum": "3 stages, no curriculum (data mixed)",
         "curriculum_no_staging": "curriculum, no staging (all weights)",
         "text": "text-only model, no image (blind baseline)"}
# The seed's "either alone is worse than both" (and better than neither): (a, b, claim a > b),
# in the report beside BPE > no BPE and staged + curriculum > single stage.
PARTIAL_CLAIMS = (
    ("full", "staged_no_curriculum", "staged + curriculum &gt; staged, no curriculum"),
    ("full", "curriculum_no_staging", "staged + curriculum &gt; curriculum, no staging"),
    ("staged_no_curriculum", "single_stage", "staged, no curriculum &gt; single stage"),
    ("curriculum_no_staging", "single_stage", "curriculum, no staging &gt; single stage"))


# Config keys a stored result must agree on to be reused: the blind baseline's, the runs'.
TEXT_RESULT_KEYS = train.TEXT_MUST_MATCH + ("lm.text_lr", "lm.num_eval", "lm.max_answer_tokens",
                                            "lm.max_caption_tokens", "data")
RESULT_KEYS = TEXT_RESULT_KEYS + train.MUST_MATCH[len(train.TEXT_MUST_MATCH):] + (
    "lm.stage_lrs", "lm.single_stage_lr")


def _result_path(workdir, run):
  return os.path.join(workdir, "lm", run, "result.json")


def _fingerprint(config, run) -> dict:
  d = manifest.config_dict(config)
  out = {}
  for key in TEXT_RESULT_KEYS if run == "text" else RESULT_KEYS:
    v = d
    for part in key.split("."):
      v = v.get(part, "<missing>") if isinstance(v, dict) else "<missing>"
    out[key] = v
  return out


def _load(path, config, run):
  """The stored result, or None; a result written with another config raises."""
  if not os.path.exists(path):
    return None
  result = fileio.read_json(path, what=f"result of LM run {run!r}")
  want = _fingerprint(config, run)
  bad = [k for k in want if result.get("config", {}).get(k, "<missing>") != want[k]]
  if bad:
    raise ValueError(f"{path} was written with another config (differs at {bad}); remove "
                     f"{os.path.dirname(path)} to retrain")
  return result


def _save(path, result):
  fileio.write_json(path, result)  # atomic; NaN (e.g. no seen-composition question) -> null


class _Context:
  """Tokenizer, sources, test examples and the text model, built on first use."""

  def __init__(self, config, workdir):
    self.config, self.workdir = config, workdir
    self.tok = data_stage.load_tokenizer(workdir)
    self.train = data_stage.data_source(config, workdir, "train")
    self.test = evaluate.first_examples(data_stage.data_source(config, workdir, "test"),
                                        config.lm.num_eval)
    self.mesh = train.make_mesh(config)
    self._text = None

  def text_params(self):
    if self._text is None:
      self._text = train.pretrain_text(self.config, self.workdir, self.tok, self.train,
                                       self.mesh)
    return self._text

  def visual(self, kind):
    return sequences.load_visual_tokens(self.workdir, kind,
                                        vq_start=train.text_rows(self.config, self.tok))


def _wrong_image(ctx, model, params, visual):
  """The wrong-image control of a trained run (call inside the trainer's mesh context)."""
  c = ctx.config.lm
  wrong = evaluate.evaluate(model, params, ctx.tok, ctx.test,
                            evaluate.OtherImage(visual, ctx.test), batch_size=c.eval_batch_size,
                            max_answer_tokens=c.max_answer_tokens, captions=False,
                            grid=train.grid_positions(ctx.config))
  return {k: wrong[k] for k in ("vqa_acc", "vqa_acc_by_type", "answers")}


def _used_ids(ctx, run, visual):
  """Sorted ids in the run's training data: every train example formatted as each task of
  stage 0 and of the run (with its image tokens; "icl": one episode drawn per example), plus
  all its texts."""
  tasks = {t for p in train.plan_of(ctx.config, "text") + train.plan_of(ctx.config, run)
           for t in p.tasks}
  ids = set()
  for i in range(len(ctx.train)):
    ex = tfds_builders.decode_record(ctx.train[i])
    for task in sorted(tasks):
      ids.update(pipeline.format_example(ex, task, ctx.tok, image_tokens=visual,
                                         rng=np.random.default_rng(i))[0])
    for text in text_tokenizer.example_texts(ex):
      ids.update(ctx.tok.encode(text))
  return np.array(sorted(int(i) for i in ids))


def _embeddings(ctx, run, model, params, visual):
  """`embeddings.summary` of the input-embedding rows of tokens in the training data: text
  rows of the tokenizer's pieces (not `<img>` `</img>`, whose rows `new_text_embed` overrides),
  visual rows of VQ / BPE tokens. Padding rows and rows of tokens the data never holds (e.g.
  byte-fallback pieces) are left out: they keep their random initialisation."""
  c, used = model.config, _used_ids(ctx, run, visual)
  text = [i for i in used if i < ctx.tok.vocab_size and i not in c.new_text_ids]
  vis = [i - c.text_vocab for i in used if i >= c.text_vocab]
  tables = jax.device_get({k: params[k] for k in ("text_embed", "visual_embed")})
  return embeddings.summary(np.asarray(tables["text_embed"])[text],
                            np.asarray(tables["visual_embed"])[vis])


def _complete(ctx, run, result):
  """Adds the wrong-image control and the embedding summary to a result stored before they
  existed (restores the finished run)."""
  visual, num_vq, num_bpe = ctx.visual(KIND[run])
  model, trainer, state = train.train_run(ctx.config, ctx.workdir, run, ctx.tok, ctx.train,
                                          visual["train"], num_vq, num_bpe, ctx.text_params(),
                                          ctx.mesh)
  if "wrong_image" not in result:
    with trainer.ctx():
      result["wrong_image"] = _wrong_image(ctx, model, state["params"], visual["test"])
  if "embeddings" not in result:
    result["embeddings"] = _embeddings(ctx, run, model, state["params"], visual["train"])
  return result


def _evaluate(ctx, model, params, visual, mesh_ctx):
  c = ctx.config.lm
  with mesh_ctx():
    res = evaluate.evaluate(model, params, ctx.tok, ctx.test, visual,
                            batch_size=c.eval_batch_size, max_answer_tokens=c.max_answer_tokens,
                            max_caption_tokens=c.max_caption_tokens,
                            grid=train.grid_positions(ctx.config))
    res["wrong_image"] = _wrong_image(ctx, model, params, visual)
    shown = ctx.test[:c.report_examples]
    res["dialogues"] = evaluate.dialogue(model, params, ctx.tok, shown, visual,
                                         batch_size=c.eval_batch_size,
                                         grid=train.grid_positions(ctx.config))
  return res


def _run(ctx, run):
  """Trains (or resumes) and evaluates one run; returns its result dict."""
  text_params = ctx.text_params()  # stage 0 (shared by the runs) is not timed here
  t0 = time.perf_counter()
  visual, num_vq, num_bpe = ctx.visual(KIND[run])
  model, trainer, state = train.train_run(ctx.config, ctx.workdir, run, ctx.tok, ctx.train,
                                          visual["train"], num_vq, num_bpe, text_params,
                                          ctx.mesh)
  t_train = time.perf_counter() - t0
  res = _evaluate(ctx, model, state["params"], visual["test"], trainer.ctx)
  plan = train.plan_of(ctx.config, run)
  res.update(
      # Summed over every process that trained the run (a resumed run counts its first part).
      train_seconds=loop.train_seconds(os.path.join(ctx.workdir, "lm", run, "ckpt")),
      eval_seconds=time.perf_counter() - t0 - t_train,
      steps=sum(p.steps for p in plan),
      stages=[p.stage for p in plan],
      trainable=train.trainable_counts(ctx.config, plan, state["params"]),
      total_params=int(sum(x.size for x in jax.tree.leaves(state["params"]))),
      visual_tokens_per_image=float(visual["test"].lengths.mean()),
      final_loss=_final_loss(ctx.workdir, run),
      embeddings=_embeddings(ctx, run, model, state["params"], visual["train"]))
  return res


def final_loss(run_dir) -> float:
  """The last logged training loss of the run in `run_dir` (NaN before its first log; a torn
  last line, from a crash mid-write, is skipped as `summary.read_jsonl` does)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    raise ValueError(f"no training log {path}: train that run first")
  losses = [r["train/loss"] for r in summary.read_jsonl(path) if "train/loss" in r]
  return losses[-1] if losses else float("nan")


def _final_loss(workdir, run):
  return final_loss(train.text_dir(workdir) if run == "text" else
                    os.path.join(workdir, "lm", run))


def _text_baseline(ctx):
  """The stage-0 model asked every question without the image."""
  model = train.make_model(ctx.config, ctx.tok)
  c = ctx.config.lm
  with train.Trainer(ctx.config, model, ctx.mesh).ctx():
    res = evaluate.evaluate(model, ctx.text_params(), ctx.tok, ctx.test, None,
                            batch_size=c.eval_batch_size, max_answer_tokens=c.max_answer_tokens,
                            max_caption_tokens=c.max_caption_tokens)
  res["final_loss"] = _final_loss(ctx.workdir, "text")
  return res


def _se(p, n):
  return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def _verdict(a, b, n, claim):
  """'holds' / 'does not hold' with the gap in standard errors of the difference."""
  gap = a - b
  se = math.sqrt(_se(a, n) ** 2 + _se(b, n) ** 2)
  word = "holds" if gap > 0 else "does not hold"
  sig = "larger" if abs(gap) > 2 * se else "not larger"
  return (f"{claim}: {a:.1%} vs {b:.1%} &mdash; the seed's direction <b>{word}</b> here "
          f"(gap {gap:+.1%}, {sig} than two standard errors, &plusmn;{2 * se:.1%}, of "
          f"{n} questions).")


def _finite(metrics):
  """Drops metrics without a value (None, NaN: e.g. no held-out question in a tiny split)."""
  return {k: v for k, v in metrics.items()
          if v is not None and (not isinstance(v, float) or math.isfinite(v))}


def _by_type(results, runs):
  """VQA accuracy per question type of every run, its wrong-image control and the blind model,
  and the share of well-formed answers (html tables); per run the types it answers from the
  image (lines)."""
  acc = evaluate.accuracy_by_type
  counts = collections.Counter(shapes.question_type(q)
                               for _, q, _, _ in results["text"]["answers"])
  cols, header, lines = [acc(results["text"]["answers"])], ["text-only, no image"], []
  for run in runs:
    right = acc(results[run]["answers"])
    cols.append(right)
    header.append(run)
    if "wrong_image" not in results[run]:
      continue
    wrong = acc(results[run]["wrong_image"]["answers"])
    cols.append(wrong)
    header.append(f"{run}, wrong image")
    read = [name for name, a in right.items() if a - wrong[name] > 2 * math.hypot(
        _se(a, counts[name]), _se(wrong[name], counts[name]))]
    lines.append(f"{LABEL[run]}: question types it answers from the image (accuracy above its "
                 f"own wrong-image control by over two standard errors): "
                 f"{', '.join(read) if read else 'none'}.")
  rows = [(name, f"{chance:.0%}", counts.get(name, 0)) +
          tuple(col.get(name, float("nan")) for col in cols)
          for name, _, chance in shapes.QUESTION_TYPES]
  valid = [acc(results[run]["answers"], valid=True) for run in ["text"] + runs]
  valid_rows = [(name,) + tuple(col.get(name, float("nan")) for col in valid)
                for name, _, _ in shapes.QUESTION_TYPES]
  html = (report.table(["question type", "chance", "questions"] + header, rows)
          + "<p>Answers in the question type's format (any of its possible answers, right or "
          "wrong): a low value means the run has not learned how to answer that question, "
          "whatever it sees.</p>"
          + report.table(["question type", "text-only, no image"] + runs, valid_rows))
  return html, lines


def _embeddings_html(workdir, results, runs):
  """Per run: the separation number and a PCA | norm-histogram figure of its embedding rows."""
  rows, figs = [], []
  for run in runs:
    e = results[run]["embeddings"]
    rows.append((LABEL[run], e["num_text"], e["num_visual"], e["mean_norm_text"],
                 e["mean_norm_visual"], e["separation"], e["separation_shuffled"],
                 e["separation_p"]))
    src = report.save_image(workdir, f"lm/embeddings_{run}.png", embeddings.figure(e, run))
    figs.append(f"<p>{html.escape(LABEL[run])}<br>{report.img_tag(src, pixelated=False)}</p>")
  seps = ", ".join(f"{run} {e['separation']:.2f} (shuffled {e['separation_shuffled']:.2f}, "
                   f"p = {e['separation_p']:.2f})"
                   for run, e in ((r, results[r]["embeddings"]) for r in runs))
  return ("<h3>Text and visual embedding rows</h3><p>Being-VL reports that visual-token "
          "embeddings stay separated from, and distributed differently than, the text "
          "embeddings. Our number, <i>embedding separation</i> = |mean text row &minus; mean "
          "visual row| / mean row norm (over both tables), measures how far apart the centres "
          "of the two tables lie relative to a typical row's length (0: same centre, 1: an "
          "average row's length apart); &ldquo;shuffled&rdquo; is its mean when the same rows "
          "are dealt to two tables of the same sizes at random, the level that finite tables "
          "of one distribution reach, and p the share of 100 such deals at least as separated: "
          f"{seps}. A small p (say under 0.05) means the two tables' centres differ by more "
          "than chance; a large one, that this number cannot tell them apart. It says "
          "nothing about the spread or shape of the two clouds (the PCA and norm plots show "
          "those) nor whether the model needs the separation. Rows: the tokens in the "
          "training data; padding rows, pieces the data never holds (e.g. byte fallback) and "
          "the shadowed <code>&lt;img&gt;</code> <code>&lt;/img&gt;</code> text rows are left "
          "out. The visual rows start at random in stage 1 while the text rows come from stage "
          "0, so part of any separation is that starting point.</p>"
          + report.table(["run", "text rows", "visual rows", "mean norm, text",
                          "mean norm, visual", "embedding separation", "shuffled", "p"], rows)
          + "".join(figs))


def _section(config, workdir, results, ctx_examples):
  runs = [r for r in config.lm.runs if r in results]
  rows = []
  for run in runs + ["text"]:
    r = results[run]
    rows.append((LABEL[run], r.get("visual_tokens_per_image", "-"), r.get("steps", "-"),
                 r["vqa_acc"], r.get("wrong_image", {}).get("vqa_acc", "-"),
                 r["vqa_acc_heldout"], r["vqa_acc_seen"],
                 r["caption_precision"], r["caption_recall"], r["final_loss"]))
  table = report.table(["run", "visual tokens / image", "steps", "VQA acc",
                        "VQA acc, wrong image", "VQA acc (held-out)", "VQA acc (seen)",
                        "caption precision", "caption recall", "last train loss"], rows)
  n = results[runs[0]]["num_questions"]
  lines = []
  if "full" in results and "no_bpe" in results:
    full, raw = results["full"], results["no_bpe"]
    lines.append(_verdict(full["vqa_acc"], raw["vqa_acc"], n, "BPE &gt; no BPE") +
                 f" Raw VQ images take {raw['visual_tokens_per_image']:.0f} tokens against "
                 f"{full['visual_tokens_per_image']:.0f} with BPE "
                 f"({raw['visual_tokens_per_image'] / full['visual_tokens_per_image']:.1f}x "
                 "longer image spans), so at equal tokens per step the no-BPE run sees fewer "
                 "images.")
  if "full" in results and "single_stage" in results:
    full, single = results["full"], results["single_stage"]
    line = _verdict(full["vqa_acc"], single["vqa_acc"], n,
                    "staged + curriculum &gt; single stage")
    if single["final_loss"] < full["final_loss"]:
      frozen = sum(s for s, st in zip(config.lm.stage_steps, full["stages"]) if st < 3)
      line += (f" The single-stage run ends at a lower training loss "
               f"({single['final_loss']:.3f} vs {full['final_loss']:.3f}): it trains every "
               f"weight from the first step, while the staged run keeps most of them frozen for "
               f"{frozen} of its {full['steps']} steps; the frozen start protects a pretrained "
               "model's knowledge, which a short text pretraining gives little of.")
    lines.append(line)
  for a, b, claim in PARTIAL_CLAIMS:
    if a in results and b in results:
      lines.append(_verdict(results[a]["vqa_acc"], results[b]["vqa_acc"], n, claim))
  blind = results["text"]["vqa_acc"]
  above = [run for run in runs if results[run]["vqa_acc"] - blind > 2 * _se(blind, n) * 1.414]
  lines.append(f"Image-blind baseline (stage-0 text model, no image): {blind:.1%} VQA, caption "
               f"precision {results['text']['caption_precision']:.2f}. Runs above it by over two "
               f"standard errors: {', '.join(above) if above else 'none'}. Being above it does "
               "not by itself mean reading the image: the blind model never trained on the "
               "answer formats. The wrong-image control (by question type, below) separates "
               "the two.")
  if not above:
    lines.append("No run beats the image-blind baseline by more than two standard errors: at "
                 "this budget none answers from the image yet, so the comparisons above measure "
                 "how much each setting disturbs the text model's prior rather than how well it "
                 "reads images; more steps per stage are needed to test the seed's claims.")
  type_table, read_lines = _by_type(results, runs)
  lines += read_lines
  full = results.get("full", results[runs[0]])
  stage_rows = [(f"stage {s}", f"{t:,}", f"{t / full['total_params']:.1%}")
                for s, t in zip(full["stages"], full["trainable"])]
  c = config.lm
  heldout_se = ", ".join(
      f"{run} {results[run]['vqa_acc_heldout']:.1%} &plusmn; "
      f"{results[run]['vqa_acc_heldout_se']:.1%}" for run in runs)
  budget = (f"<p>Same budget for every run: {c.batch_size} rows &times; {c.seq_len} tokens per "
            f"step (packed), stage steps {tuple(c.stage_steps)} (single stage: their sum), "
            f"after {c.text_steps} text-only steps (stage 0, shared). Because BPE sequences are "
            f"shorter, BPE runs see more images per step. VQA on {n} questions of "
            f"{len(ctx_examples)} test images, {results[runs[0]]['num_heldout_questions']} "
            "of them about a held-out composition (they name a held-out color-shape pair or ask "
            "about an object that is one; other questions on the same images count as seen). "
            f"Held-out accuracy &plusmn; one standard error: {heldout_se}.</p>")
  dialogs = []
  for k, ex in enumerate(ctx_examples[:c.report_examples]):
    src = report.save_image(workdir, f"lm/example_{k}.png", ex["image"])
    cells = [report.Markup(report.img_tag(src, width=96))]
    for run in runs:
      turns = results[run]["dialogues"][k]
      cells.append(report.Markup("<br>".join(
          f"Q: {html.escape(q)}<br>&rarr; <b>{html.escape(a)}</b> "
          f"<span class='small'>(ref: {html.escape(ref)})</span>" for q, ref, a in turns)))
    dialogs.append(cells)
  body = (budget + table + "<ul>" + "".join(f"<li>{x}</li>" for x in lines) + "</ul>"
          + "<h3>VQA accuracy by question type</h3><p>&ldquo;Wrong image&rdquo;: the same "
          "model and questions, each shown another test image (example k gets k+1's). What a "
          "run answers above that control it reads from the right image; what it answers as "
          "well with the wrong image comes from the question and the answer format. Chance: a "
          "uniform guess among the type's answers.</p>"
          + type_table
          + _embeddings_html(workdir, results, runs)
          + "<h3>Trainable parameters per stage (full run)</h3>"
          + report.table(["stage", "trainable", "of all"], stage_rows)
          + "<h3>Example dialogues (model answers in bold)</h3>"
          + report.table(["test image"] + [LABEL[r] for r in runs], dialogs))
  return body


def run_stage(config, workdir: str) -> dict:
  """Trains/evaluates every run of `config.lm.runs` (skipping finished ones); adds the section."""
  train.check_config(config)
  bad = [r for r in config.lm.runs if r not in train.RUNS]
  if bad or not config.lm.runs:
    raise ValueError(f"lm.runs={config.lm.runs!r}: expected a non-empty subset of {train.RUNS}")
  ctx = _Context(config, workdir)
  results = {}
  for run in list(config.lm.runs) + ["text"]:
    path = _result_path(workdir, run)
    results[run] = _load(path, config, run)
    if results[run] is None:
      logging.info("lm: run %s", run)
      results[run] = _text_baseline(ctx) if run == "text" else _run(ctx, run)
      results[run]["config"] = _fingerprint(config, run)
      _save(path, results[run])
    elif run != "text" and not {"wrong_image", "embeddings"} <= set(results[run]):
      logging.info("lm: wrong-image control / embedding summary of run %s", run)
      _save(path, _complete(ctx, run, results[run]))
    # From the stored answers: a result saved before the held-out definition changed agrees.
    results[run].update(evaluate.heldout_scores(results[run]["answers"], ctx.test))
  metrics = {"lm.vqa_acc.text_only": results["text"]["vqa_acc"]}
  for run in config.lm.runs:
    r = results[run]
    metrics.update({f"lm.vqa_acc.{run}": r["vqa_acc"], f"lm.vqa_acc_heldout.{run}":
                    r["vqa_acc_heldout"], f"lm.vqa_acc_heldout_se.{run}":
                    r["vqa_acc_heldout_se"], f"lm.caption_precision.{run}": r["caption_precision"],
                    f"lm.caption_recall.{run}": r["caption_recall"],
                    f"lm.train_seconds.{run}": r["train_seconds"],
                    f"lm.visual_tokens_per_image.{run}": r["visual_tokens_per_image"],
                    f"lm.embed_separation.{run}": r["embeddings"]["separation"],
                    f"lm.embed_separation_shuffled.{run}": r["embeddings"]["separation_shuffled"],
                    f"lm.embed_separation_p.{run}": r["embeddings"]["separation_p"]})
  for run in list(config.lm.runs) + ["text"]:
    name = "text_only" if run == "text" else run
    metrics.update({f"lm.vqa_acc_by_type.{name}.{t}": a
                    for t, a in evaluate.accuracy_by_type(results[run]["answers"]).items()})
    wrong = results[run].get("wrong_image")
    if wrong:
      metrics[f"lm.vqa_acc_wrong_image.{name}"] = wrong["vqa_acc"]
      metrics.update({f"lm.vqa_acc_by_type_wrong_image.{name}.{t}": a
                      for t, a in evaluate.accuracy_by_type(wrong["answers"]).items()})
  full = results.get("full")
  if full is not None:
    metrics.update({f"lm.trainable_params.stage{s}": t
                    for s, t in zip(full["stages"], full["trainable"])})
  metrics = _finite(metrics)
  report.add_section(workdir, key="lm", title="Unified model: staged training and ablations",
                     order=40, html=_section(config, workdir, results, ctx.test),
                     metrics=metrics)
  return metrics


def run_text_stage(config, workdir: str) -> dict:
  """Pipeline stage `text`: stage 0, the text-only model (`train.pretrain_text`, `$W/text`) that
  Being-VL's runs (the `lm` stage) start from and V2L's frozen LM (the `text_icl` and `v2l`
  stages) is made of; adds a short section. A stage of its own, so that neither reader waits
  for the other and each is keyed by its own fields only."""
  train.check_config(config)
  tok = data_stage.load_tokenizer(workdir)
  params = train.pretrain_text(config, workdir, tok, data_stage.data_source(
      config, workdir, "train"), train.make_mesh(config))
  plan = train.plan_of(config, "text")[0]
  metrics = {"text.steps": plan.steps,
             "text.final_loss": _final_loss(workdir, "text"),
             "text.train_seconds": loop.train_seconds(os.path.join(train.text_dir(workdir),
                                                                   "ckpt")),
             "text.params": int(sum(x.size for x in jax.tree.leaves(params)))}
  c = config.lm
  body = (f"<p>The text-only model that stands in for a pretrained LLM: {plan.steps} steps of "
          f"{c.batch_size} rows &times; {c.seq_len} tokens at peak learning rate {plan.lr} on "
          f"the training split's texts ({', '.join(html.escape(t) for t in plan.tasks)}), "
          f"{metrics['text.params']:,} parameters; last training loss "
          f"{metrics['text.final_loss']:.3f}. Being-VL's runs (next section) extend its "
          "vocabulary with the visual tokens and start from it; V2L reads it (or its "
          "continuation on <code>lm.text_phases</code>) as its frozen language model.</p>")
  report.add_section(workdir, key="text", title="Text model (stage 0)", order=35, html=body,
                     metrics=_finite(metrics))
  return metrics
