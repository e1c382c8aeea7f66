"""Pipeline stage `v2l`: the V2L tokenizer and few-shot classification by the frozen text LM.

From the frozen stage-0 text LM (`lm/text`) and the CLIP (`clip`):
  1. the codebooks and the tokenizer (`train.py`), and the test split's reconstruction PSNR with
     and without the global tokens in the decoder;
  2. N-way K-shot shape classification (`fewshot.py`) for every `v2l.fewshot_ways` x
     `v2l.fewshot_shots`, `v2l.fewshot_episodes` episodes each: the frozen LM reads each
     image's first `v2l.fewshot_global` global tokens as its own subword ids; chance 1 / way;
  3. the text-only control: the same prompts and decoder on symbol strings (data/icl.py), so the
     reader sees how much of the accuracy the LM's in-context ability gives and how much the
     tokenizer earns.
Writes `$W/v2l/` (checkpoints, codebook.npz, fewshot.json with every episode's prediction) and
the report section.
  4. restoration (`restore.py`): inpaint, outpaint, deblur, shift, rotate on the first
     `v2l.restore_images` test images; PSNR gain of the restored image over the corrupted one.
"""

import html
import os

import numpy as np

from vlbpe_jax import fileio
from vlbpe_jax.eval import report
from vlbpe_jax.v2l import fewshot
from vlbpe_jax.v2l import prompts
from vlbpe_jax.v2l import restore
from vlbpe_jax.v2l import train


def setting(way: int, shot: int) -> str:
  return f"{way}way_{shot}shot"


def run_fewshot(ctx: train.Context) -> dict:
  """Every (way, shot): {"image": rows, "text": rows} (rows as `fewshot.run_tasks`)."""
  c = ctx.config.v2l
  k = int(c.fewshot_global)
  ids = {"train": [ctx.books.global_ids(t[:k]) for t in ctx.train_tokens],
         "test": [ctx.books.global_ids(t[:k]) for t in ctx.test_tokens]}
  train_y = fewshot.single_object_labels(ctx.train["objects"])
  test_y = fewshot.single_object_labels(ctx.test["objects"])
  out = {}
  for way in c.fewshot_ways:
    for shot in c.fewshot_shots:
      num, seed = int(c.fewshot_episodes), int(ctx.config.seed)
      tasks = fewshot.image_tasks(train_y, test_y, way=int(way), shot=int(shot), num=num,
                                  seed=seed)
      out[setting(way, shot)] = {
          "way": int(way), "shot": int(shot),
          "image": fewshot.run_tasks(ctx.lm, tasks, lambda i, split: ids[split][i],
                                     batch_size=int(c.fewshot_batch)),
          "text": fewshot.text_rows(ctx.lm, way=int(way), shot=int(shot), num=num, seed=seed,
                                    batch_size=int(c.fewshot_batch))}
  return out


def fewshot_metrics(results) -> dict:
  """`v2l.fewshot_acc.*`, `v2l.chance.*`, `v2l.fewshot_text_only.*` from the stored rows."""
  m = {}
  for name, r in results.items():
    m[f"v2l.fewshot_acc.{name}"] = fewshot.accuracy(r["image"])
    m[f"v2l.chance.{name}"] = 1.0 / r["way"]
    m[f"v2l.fewshot_text_only.{name}"] = fewshot.accuracy(r["text"])
  return m


def _example_prompt(ctx, results) -> str:
  """The shortest setting's first prompt, decoded, for the report."""
  c = ctx.config.v2l
  k = int(c.fewshot_global)
  train_y = fewshot.single_object_labels(ctx.train["objects"])
  test_y = fewshot.single_object_labels(ctx.test["objects"])
  way, shot = int(c.fewshot_ways[0]), int(c.fewshot_shots[0])
  tasks = fewshot.image_tasks(train_y, test_y, way=way, shot=shot, num=1, seed=int(
      ctx.config.seed))
  if not tasks:
    return ""
  t = tasks[0]
  support = [(ctx.books.global_ids(ctx.train_tokens[i][:k]), y) for i, y in t["support"]]
  ids = prompts.classification_prompt(ctx.lm.tok, support,
                                      ctx.books.global_ids(ctx.test_tokens[t["query"]][:k]),
                                      t["classes"])
  return ctx.lm.tok.decode(ids)


def run_stage(config, workdir: str) -> dict:
  ctx, state, res = train.train_and_evaluate(config, workdir)
  results = run_fewshot(ctx)
  fileio.write_json(os.path.join(train.run_dir(workdir), "fewshot.json"), results)
  psnr = res["recon_psnr_db"]
  metrics = {"v2l.recon_psnr_db.local": psnr["local"],
             "v2l.recon_psnr_db.local_global": psnr["local_global"],
             "v2l.num_local_tokens": res["num_local"],
             "v2l.num_global_entries": res["num_global_entries"],
             **fewshot_metrics(results)}
  if np.isfinite(res["train_seconds"]):
    metrics["v2l.train_seconds"] = res["train_seconds"]
  rest = restore.run(ctx, state["params"], num=int(config.v2l.restore_images),
                     seed=int(config.seed))
  fileio.write_json(os.path.join(train.run_dir(workdir), "restore.json"),
                    {t: {k: v for k, v in r.items() if k != "images"} for t, r in rest.items()})
  metrics.update({f"v2l.restore_psnr_gain_db.{t}": r["gain_db"] for t, r in rest.items()})
  rest_html = ""
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
  def acc(rows_):  # no episode: fewer classes with enough single-object images than `way`
    return (f"{fewshot.accuracy(rows_):.3f} (n={len(rows_)})" if rows_
            else "no episodes (too few images per class)")
  rows = [(name.replace("_", ", "), acc(r["image"]), acc(r["text"]), f"{1.0 / r['way']:.3f}")
          for name, r in results.items()]
  c = config.v2l
  words = ", ".join(ctx.books.entry_texts[j] for j in ctx.test_tokens[0][:int(c.fewshot_global)])
  body = (
      f"<p>V2L on the shapes data: the frozen stage-0 text LM's {res['num_local']} text "
      f"subwords are the local codebook, {res['num_global_entries']} uni/bi/trigrams (greedy "
      f"LM completions, CLIP-filtered) the global one. Tokenizer ({c.variant}) trained "
      f"{int(c.total_steps)} steps x {int(c.batch_size)} with L1 + quantisation loss (no GAN, "
      "no LPIPS). Test reconstruction PSNR: "
      f"{psnr['local']:.2f} dB from the local tokens alone, {psnr['local_global']:.2f} dB with "
      f"the {int(c.num_global)} global tokens.</p>"
      f"<p>Rows: real test images, decoded without, and with the global tokens.</p>"
      f"{report.img_tag(src, width=n * 96)}"
      f"<p>Few-shot shape classification by the frozen LM: queries from the test split's "
      f"single-object scenes, support from the train split's; {int(c.fewshot_global)} global "
      "tokens per image fed as LM ids; greedy decoding constrained to the class names. The "
      "text-only control runs the same prompt layout on symbol strings (stage 0's in-context "
      "episodes): what the LM can do in context at all.</p>"
      + report.table(("setting", "accuracy (global tokens)", "text-only control", "chance"),
                     rows)
      + f"<p>First test image's global tokens: <code>{html.escape(words)}</code></p>"
      f"<p>Example prompt:</p><pre class='small'>{html.escape(_example_prompt(ctx, results))}"
      "</pre>"
      "<h3>Restoration</h3><p>The frozen LM predicts local tokens in context (V2L's protocol, "
      "v2l/restore.py: 10 noisy copies of the clean image's map as examples, as the public "
      "code; inpaint/outpaint n = 16 -> m = 2 with write-back, the others n = m = 2), decoded "
      "without global tokens. Rows: clean, corrupted input, restored.</p>" + rest_html)
  metrics = {k: v for k, v in metrics.items() if v is not None and np.isfinite(v)}
  report.add_section(workdir, key="v2l", title="V2L: images as the frozen LM's tokens",
                     order=70, html=body, metrics=metrics)
  return metrics
