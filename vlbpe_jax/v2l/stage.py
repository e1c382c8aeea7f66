"""Pipeline stage `v2l`: the V2L tokenizer and few-shot classification by the frozen text LM.

From the frozen stage-0 text LM (the `text` stage's, or with `lm.text_phases` its continuation
on in-context episodes, the `text_icl` stage's: `run_lm_stage`) and the CLIP (`clip`):
  1. the codebooks and the tokenizer (`train.py`), and the test split's reconstruction PSNR with
     and without the global tokens in the decoder, and the share of local tokens in use;
  2. N-way K-shot shape classification (`fewshot.py`) for every `v2l.fewshot_ways` x
     `v2l.fewshot_shots`, `v2l.fewshot_episodes` episodes each: the frozen LM reads each
     image's first `v2l.fewshot_global` global tokens as its own subword ids; chance 1 / way;
  3. the text-only control: the same prompts and decoder on symbol strings (data/icl.py), so the
     reader sees how much of the accuracy the LM's in-context ability gives, and the
     token-overlap control (no LM: the class whose support images share the most global tokens
     with the query), what the tokens themselves tell apart; variants at
     `v2l.variant_settings`: colour labels, all `num_global` tokens, and the local token map
     added; few-shot captioning and VQA (`describe.py`) against
     a wrong-image control.
Writes `$W/v2l/` (checkpoints, codebook.npz, fewshot.json with every episode's prediction) and
the report section.
  4. restoration (`restore.py`): inpaint, outpaint, deblur, shift, rotate on the first
     `v2l.restore_images` test images; PSNR gain of the restored image over the corrupted one,
     by the frozen LM and by the majority-vote control (no LM: what the tokenizer allows);
     and its text-only control (`restore.text_only`: the restoration prompt on random local
     tokens, `v2l.restore_text_only.{n2,n16}`): what the LM restores in context at all.
Steps 2-3 and step 4 read only the trained run, so with `stage_workers` > 1 restoration runs on
a thread beside them (each computes what it would alone: the same numbers).
"""

from concurrent import futures
import html
import os

import numpy as np

from vlbpe_jax import fileio
from vlbpe_jax import loop
from vlbpe_jax import parallel
from vlbpe_jax.eval import report
from vlbpe_jax.lm import stage as lm_stage
from vlbpe_jax.lm import train as lm_train
from vlbpe_jax.v2l import describe
from vlbpe_jax.v2l import fewshot
from vlbpe_jax.v2l import prompts
from vlbpe_jax.v2l import restore
from vlbpe_jax.v2l import train


def setting(way: int, shot: int) -> str:
  return f"{way}way_{shot}shot"


# Classification variants beside the main table (shape labels, `fewshot_global` tokens), each at
# `v2l.variant_settings`: "color" (colour labels), "global_all" (all `num_global` tokens; the
# seed: more tokens -> better), "local" (the global tokens, then the image's local token map).
VARIANTS = ("color", "global_all", "local")


def _ids_fn(ctx, params, num_global: int, local: bool):
  """image_ids(index, split) -> the image's LM ids: its first `num_global` global entries
  (each its subword ids), then with `local` its local token map (LM ids, row-major)."""
  ids = {split: [ctx.books.global_ids(t[:num_global]) for t in tokens]
         for split, tokens in (("train", ctx.train_tokens), ("test", ctx.test_tokens))}
  if local:
    for split, data in (("train", ctx.train), ("test", ctx.test)):
      maps = ctx.books.lm_ids[train.encode_ids(ctx.s, params, data["images"])]
      ids[split] = [g + [[int(i) for i in m.reshape(-1)]] for g, m in zip(ids[split], maps)]
  return lambda i, split: ids[split][i]


def _classify(ctx, image_ids, way, shot, attribute="shape", text_control=True,
              overlap_control=True):
  """{"way", "shot", "image": rows, "text": rows of the text-only control (or []), "overlap":
  rows of the token-overlap control (or [])}."""
  c, seed = ctx.config.v2l, int(ctx.config.seed)
  num = int(c.fewshot_episodes)
  train_y = fewshot.single_object_labels(ctx.train["objects"], attribute)
  test_y = fewshot.single_object_labels(ctx.test["objects"], attribute)
  tasks = fewshot.image_tasks(train_y, test_y, way=int(way), shot=int(shot), num=num, seed=seed)
  label_set = "color" if attribute == "color" else "shape"
  text = fewshot.text_rows(ctx.lm, way=int(way), shot=int(shot), num=num, seed=seed,
                           batch_size=int(c.fewshot_batch), label_set=label_set) if (
                               text_control) else []
  return {"way": int(way), "shot": int(shot), "text": text,
          "image": fewshot.run_tasks(ctx.lm, tasks, image_ids, batch_size=int(c.fewshot_batch)),
          "overlap": fewshot.overlap_rows(tasks, image_ids, seed=seed) if overlap_control else []}


def run_fewshot(ctx: train.Context, params) -> dict:
  """{"classify": {setting: {"way", "shot", "image": rows, "text": rows}} (shape labels),
  "variants": {variant: {setting: ...}}, "caption": {"image", "wrong_image"} rows,
  "vqa": {"image", "wrong_image"} rows} — every row stored, every metric recomputed from them."""
  c = ctx.config.v2l
  k = int(c.fewshot_global)
  base = _ids_fn(ctx, params, k, False)
  out = {"classify": {setting(w, s): _classify(ctx, base, w, s)
                      for w in c.fewshot_ways for s in c.fewshot_shots}, "variants": {}}
  fns = {"color": base, "global_all": _ids_fn(ctx, params, int(c.num_global), False),
         "local": _ids_fn(ctx, params, k, True)}
  for variant in VARIANTS:
    out["variants"][variant] = {
        setting(way, shot): _classify(  # shape labels: the main table's text control
            ctx, fns[variant], way, shot, "color" if variant == "color" else "shape",
            text_control=variant == "color", overlap_control=variant != "local")
        for way, shot in c.variant_settings}
  n_test, seed, batch = len(ctx.test["images"]), int(ctx.config.seed), int(c.fewshot_batch)
  tasks = describe.caption_tasks(len(ctx.train["images"]), n_test, shot=int(c.caption_shots),
                                 num=int(c.describe_queries), seed=seed)
  out["caption"] = {
      ("wrong_image" if ctl else "image"): describe.run_captions(
          ctx.lm, tasks, base, ctx.train["captions"], num_test=n_test, control=ctl,
          max_new_tokens=int(c.max_caption_tokens), batch_size=batch)
      for ctl in (False, True)}
  tasks = describe.vqa_tasks(ctx.train["qa"], ctx.test["qa"], shot=int(c.vqa_shots),
                             num=int(c.describe_queries), seed=seed)
  out["vqa"] = {("wrong_image" if ctl else "image"): describe.run_vqa(
      ctx.lm, tasks, base, num_test=n_test, control=ctl, batch_size=batch)
                for ctl in (False, True)}
  return out


def fewshot_metrics(results, test_objects) -> dict:
  """`v2l.fewshot_acc.*`, `v2l.chance.*`, `v2l.fewshot_text_only.*`, `v2l.fewshot_overlap.*`,
  the variants' `v2l.fewshot_acc_{variant}.*` and `v2l.fewshot_overlap_{variant}.*`,
  `v2l.caption[_wrong_image].{precision,recall}` and `v2l.vqa_acc[_wrong_image]`, from the
  stored rows (NaN where a control has no rows)."""
  m = {}
  for name, r in results["classify"].items():
    m[f"v2l.fewshot_acc.{name}"] = fewshot.accuracy(r["image"])
    m[f"v2l.chance.{name}"] = 1.0 / r["way"]
    m[f"v2l.fewshot_text_only.{name}"] = fewshot.accuracy(r["text"])
    m[f"v2l.fewshot_overlap.{name}"] = fewshot.accuracy(r["overlap"])
  for variant, settings in results["variants"].items():
    for name, r in settings.items():
      m[f"v2l.fewshot_acc_{variant}.{name}"] = fewshot.accuracy(r["image"])
      m[f"v2l.fewshot_overlap_{variant}.{name}"] = fewshot.accuracy(r["overlap"])
      if variant == "color":
        m[f"v2l.fewshot_text_only_color.{name}"] = fewshot.accuracy(r["text"])
  for kind, rows in results["caption"].items():
    suffix = "" if kind == "image" else "_wrong_image"
    for k, v in describe.caption_scores(rows, test_objects).items():
      m[f"v2l.caption{suffix}.{k}"] = v
  for kind, rows in results["vqa"].items():
    m["v2l.vqa_acc" + ("" if kind == "image" else "_wrong_image")] = describe.vqa_accuracy(rows)
  return m


def _example_prompt(ctx):
  """The first setting's first prompt, decoded, and its images (support..., query)."""
  c = ctx.config.v2l
  k = int(c.fewshot_global)
  train_y = fewshot.single_object_labels(ctx.train["objects"])
  test_y = fewshot.single_object_labels(ctx.test["objects"])
  way, shot = int(c.fewshot_ways[0]), int(c.fewshot_shots[0])
  tasks = fewshot.image_tasks(train_y, test_y, way=way, shot=shot, num=1, seed=int(
      ctx.config.seed))
  if not tasks:
    return "", None
  t = tasks[0]
  support = [(ctx.books.global_ids(ctx.train_tokens[i][:k]), y) for i, y in t["support"]]
  ids = prompts.classification_prompt(ctx.lm.tok, support,
                                      ctx.books.global_ids(ctx.test_tokens[t["query"]][:k]),
                                      t["classes"])
  images = np.stack([ctx.train["images"][i] for i, _ in t["support"]]
                    + [ctx.test["images"][t["query"]]])
  return ctx.lm.tok.decode(ids), images


def _acc(rows):  # no episode: fewer classes with enough single-object images than `way`
  return (f"{fewshot.accuracy(rows):.3f} (n={len(rows)})" if rows
          else "no episodes (too few images per class)")


def _describe_html(workdir, ctx, results, metrics) -> str:
  """Captioning and VQA: scores against the wrong-image control, a few captions with images."""
  m = lambda k: f"{metrics.get(k, float('nan')):.3f}"  # noqa: E731
  c = ctx.config.v2l
  rows = results["caption"]["image"][:4]
  html_ = (
      f"<h3>Captioning and VQA from global tokens</h3><p>Captioning: {int(c.caption_shots)} "
      "train images with their caption, then the query; the greedy continuation scored with "
      "the scene checker's caption parser. VQA: "
      f"{int(c.vqa_shots)} examples of the same question template, exact match. The control "
      "gives the query another test image's tokens.</p>"
      + report.table(("task", "with the image's tokens", "wrong-image control"), [
          ("caption attribute precision", m("v2l.caption.precision"),
           m("v2l.caption_wrong_image.precision")),
          ("caption attribute recall", m("v2l.caption.recall"),
           m("v2l.caption_wrong_image.recall")),
          (f"VQA exact match (n={len(results['vqa']['image'])})", m("v2l.vqa_acc"),
           m("v2l.vqa_acc_wrong_image"))]))
  if rows:
    src = report.save_image(workdir, "v2l/captions.png", report.image_grid(
        np.stack([ctx.test["images"][r["query"]] for r in rows]), ncols=len(rows)))
    html_ += (report.img_tag(src, width=len(rows) * 96) + "<ol>" + "".join(
        f"<li>{html.escape(r['text'] or '(empty)')} <span class='small'>(true: "
        f"{html.escape(ctx.test['captions'][r['query']][0])})</span></li>" for r in rows)
              + "</ol>")
  return html_


def _restoration(ctx, params, config):
  """(frozen LM's restorations, the majority-vote control's, the text-only control)."""
  kw = dict(num=int(config.v2l.restore_images), seed=int(config.seed))
  return (restore.run(ctx, params, predictor="lm", **kw),
          restore.run(ctx, params, predictor="majority", **kw),
          restore.text_only(ctx.lm, ctx.books.lm_ids, num=int(config.v2l.restore_text_only),
                            seed=int(config.seed)))


def run_stage(config, workdir: str) -> dict:
  ctx, state, res = train.train_and_evaluate(config, workdir)
  pool = None
  if parallel.stage_workers(config) > 1:  # restoration beside the few-shot tasks: each of
    # them keeps about one core busy
    pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="v2l_restore")
    restoration = pool.submit(_restoration, ctx, state["params"], config)
    pool.shutdown(wait=False)
  try:
    results = run_fewshot(ctx, state["params"])
  except Exception:
    if pool is not None:
      futures.wait([restoration])  # no thread left running into the next stage or the exit
    raise
  rest, ctl, text = (restoration.result() if pool is not None
                     else _restoration(ctx, state["params"], config))
  fileio.write_json(os.path.join(train.run_dir(workdir), "fewshot.json"), results)
  psnr = res["recon_psnr_db"]
  metrics = {"v2l.recon_psnr_db.local": psnr["local"],
             "v2l.recon_psnr_db.local_global": psnr["local_global"],
             "v2l.codebook_usage": res["codes"]["usage"],
             "v2l.codebook_perplexity": res["codes"]["perplexity"],
             "v2l.num_local_tokens": res["num_local"],
             "v2l.num_global_entries": res["num_global_entries"],
             **fewshot_metrics(results, ctx.test["objects"])}
  if np.isfinite(res["train_seconds"]):
    metrics["v2l.train_seconds"] = res["train_seconds"]
  strip = lambda res: {t: {k: v for k, v in r.items() if k != "images"}  # noqa: E731
                       for t, r in res.items()}
  fileio.write_json(os.path.join(train.run_dir(workdir), "restore.json"),
                    {**strip(rest), "majority_control": strip(ctl)})
  metrics.update({f"v2l.restore_psnr_gain_db.{t}": r["gain_db"] for t, r in rest.items()})
  metrics.update({f"v2l.restore_psnr_gain_db_majority.{t}": r["gain_db"]
                  for t, r in ctl.items()})
  num_text = int(config.v2l.restore_text_only)
  for n, r in text.items():
    metrics[f"v2l.restore_text_only.{n}"] = r["lm"]
    metrics[f"v2l.restore_text_only_majority.{n}"] = r["majority"]
  rest_html = report.table(
      ("task", "gain, frozen LM (dB)", "gain, majority-vote control (dB)",
       "decoded corrupted map (dB)", "corrupted pixels (dB)"),
      [(t, f"{r['gain_db']:+.2f}", f"{ctl[t]['gain_db']:+.2f}",
        f"{np.mean(r['psnr_corrupted']):.2f}", f"{np.mean(r['psnr_corrupted_pixels']):.2f}")
       for t, r in rest.items()])
  rest_html += (
      f"<p>Text-only control ({num_text} in-context denoising prompts per n, "
      "data/icl.denoise_task: the same layout and rates on random local tokens, no image): "
      "share of prompts whose outputs are all the clean tokens, "
      + "; ".join(f"n = {n[1:]}: frozen LM {r['lm']:.0%}, majority vote {r['majority']:.0%}"
                  for n, r in text.items())
      + ". What the LM can restore in context at all.</p>")
  for t, r in rest.items():
    clean, bad, fixed = r["images"]
    k = min(4, len(clean))
    src = report.save_image(workdir, f"v2l/restore_{t}.png", report.image_grid(
        np.concatenate([clean[:k], bad[:k], fixed[:k]]), ncols=k))
    rest_html += (f"<h4>{t}: gain {r['gain_db']:+.2f} dB (restored "
                  f"{np.mean(r['psnr_restored']):.2f} dB vs the decoded corrupted map "
                  f"{np.mean(r['psnr_corrupted']):.2f} dB; corrupted pixels "
                  f"{np.mean(r['psnr_corrupted_pixels']):.2f} dB)</h4>"
                  + report.img_tag(src, width=k * 96))
  # Reconstructions: real, without and with the global tokens.
  n = min(8, len(ctx.test["images"]))
  images = ctx.test["images"][:n]
  idx = train.encode_ids(ctx.s, state["params"], images)
  g = ctx.global_emb(ctx.test_tokens[:n])
  grid = np.concatenate([images, train.decode_ids(ctx.s, state["params"], idx, g, False),
                         train.decode_ids(ctx.s, state["params"], idx, g, True)])
  src = report.save_image(workdir, "v2l/recon.png", report.image_grid(grid, ncols=n))
  rows = [(name.replace("_", ", "), _acc(r["image"]), _acc(r["text"]), _acc(r["overlap"]),
           f"{1.0 / r['way']:.3f}") for name, r in results["classify"].items()]
  c = config.v2l
  what = {"color": "colour labels", "global_all": f"all {int(c.num_global)} global tokens",
          "local": f"{int(c.fewshot_global)} global + the local token map"}
  variant_rows = [(what[v], name.replace("_", ", "), _acc(r["image"]),
                   _acc(r["text"]) if v == "color" else "(as above)",
                   _acc(r["overlap"]) if r["overlap"] else "-", f"{1.0 / r['way']:.3f}")
                  for v, settings in results["variants"].items() for name, r in settings.items()]
  prompt_text, prompt_images = _example_prompt(ctx)
  prompt_img = ""
  if prompt_images is not None:
    psrc = report.save_image(workdir, "v2l/prompt_images.png",
                             report.image_grid(prompt_images, ncols=len(prompt_images)))
    prompt_img = ("<p>Its images (support in order, the query last):</p>"
                  + report.img_tag(psrc, width=len(prompt_images) * 96))
  words = ", ".join(ctx.books.entry_texts[j] for j in ctx.test_tokens[0][:int(c.fewshot_global)])
  body = (
      f"<p>V2L on the shapes data: the frozen stage-0 text LM's {res['num_local']} text "
      f"subwords are the local codebook, {res['num_global_entries']} uni/bi/trigrams (greedy "
      f"LM completions, CLIP-filtered) the global one. Tokenizer ({c.variant}) trained "
      f"{int(c.total_steps)} steps x {int(c.batch_size)} with L1 + quantisation loss (no GAN, "
      "no LPIPS). Test reconstruction PSNR: "
      f"{psnr['local']:.2f} dB from the local tokens alone, {psnr['local_global']:.2f} dB with "
      f"the {int(c.num_global)} global tokens. Local tokens in use on the test split: "
      f"{res['codes']['usage']:.1%} of {res['num_local']} (perplexity "
      f"{res['codes']['perplexity']:.1f}).</p>"
      f"<p>Rows: real test images, decoded without, and with the global tokens.</p>"
      f"{report.img_tag(src, width=n * 96)}"
      f"<p>Few-shot shape classification by the frozen LM: queries from the test split's "
      f"single-object scenes, support from the train split's; {int(c.fewshot_global)} global "
      "tokens per image fed as LM ids; greedy decoding constrained to the class names. The "
      "text-only control runs the same prompt layout on symbol strings (stage 0's in-context "
      "episodes): what the LM can do in context at all. The token-overlap control (no LM) "
      "answers with the class whose support images share the most global tokens with the "
      "query: what plain matching of the tokens tells apart, no LM involved.</p>"
      + report.table(("setting", "accuracy (global tokens)", "text-only control",
                      "token-overlap control (no LM)", "chance"), rows)
      + "<p>Variants (the seed: more global tokens help; labels by colour instead of shape; "
      "local tokens added):</p>"
      + report.table(("variant", "setting", "accuracy", "text-only control",
                      "token-overlap control", "chance"), variant_rows)
      + f"<p>First test image's global tokens: <code>{html.escape(words)}</code></p>"
      f"<p>Example prompt:</p><pre class='small'>{html.escape(prompt_text)}</pre>{prompt_img}"
      + _describe_html(workdir, ctx, results, metrics)
      + "<h3>Restoration</h3><p>The frozen LM predicts local tokens in context (V2L's protocol, "
      "v2l/restore.py: 10 noisy copies of the clean image's map as examples, as the public "
      "code; inpaint/outpaint n = 16 -> m = 2 with write-back, the others n = m = 2), decoded "
      "without global tokens. The control writes each window's most frequent example output "
      "(a perfect in-context copier, no LM): its gain is what this tokenizer lets restoration "
      "reach. Images: clean, corrupted input, restored by the LM.</p>" + rest_html)
  metrics = {k: v for k, v in metrics.items() if v is not None and np.isfinite(v)}
  report.add_section(workdir, key="v2l", title="V2L: images as the frozen LM's tokens",
                     order=70, html=body, metrics=metrics)
  return metrics


def run_lm_stage(config, workdir: str) -> dict:
  """Pipeline stage `text_icl`: V2L's frozen LM, stage 0 continued on `lm.text_phases`
  (`train.train_text_lm`, `$W/text_icl`; nothing to train without phases: V2L then reads stage 0
  itself); adds a short section. A stage of its own, so that a change of V2L's settings keeps
  it and Being-VL's runs never wait for it."""
  lm_train.check_config(config)
  phases = lm_train.text_phases(config)
  train.train_text_lm(config, workdir)
  if not phases:
    metrics = {"text_icl.steps": 0}
    body = ("<p>No <code>lm.text_phases</code>: V2L reads stage 0's text model itself as its "
            "frozen language model.</p>")
  else:
    plan = lm_train.plan_of(config, "text_icl")
    run_dir = lm_train.icl_dir(workdir)
    metrics = {"text_icl.steps": sum(p.steps for p in plan),
               "text_icl.final_loss": lm_stage.final_loss(run_dir),
               "text_icl.train_seconds": loop.train_seconds(os.path.join(run_dir, "ckpt"))}
    rows = [(k + 1, p.steps, ", ".join(p.tasks), p.lr, p.seq_len or config.lm.seq_len)
            for k, p in enumerate(plan)]
    body = ("<p>V2L's frozen language model: stage 0's text model continued on these phases "
            "(each with its own warm-up and cosine; Adam's moments carried over), so that it "
            "copies in context as V2L's restoration and few-shot prompts ask; Being-VL's runs "
            f"start from stage 0 itself. Last training loss {metrics['text_icl.final_loss']:.3f}."
            "</p>" + report.table(["phase", "steps", "tasks", "peak LR", "row tokens"], rows))
  metrics = {k: v for k, v in metrics.items() if np.isfinite(v)}  # NaN: no loss logged yet
  report.add_section(workdir, key="text_icl", title="V2L's frozen LM (stage 0 continued)",
                     order=65, html=body, metrics=metrics)
  return metrics
