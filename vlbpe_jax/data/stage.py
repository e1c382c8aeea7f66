"""Pipeline stage `data`: the shapes TFDS dataset, the text tokenizer, and the report's first
section (sample scenes with their texts).

Reads `config.seed`, `config.data.{resolution, num_train, num_validation, num_test,
report_examples}` and `config.tokenizer.{vocab_size, model_type}`. Writes
  workdir/data/tfds/...            array_record shards (tfds, no TensorFlow)
  workdir/tokenizer/text.model     sentencepiece model with the reserved control tokens
Both are reused when present (the tfds config name fingerprints the generator and sizes).
"""

import html
import os

import numpy as np

from vlbpe_jax.data import icl
from vlbpe_jax.data import shapes
from vlbpe_jax.data import tfds_builders
from vlbpe_jax.data import text_tokenizer
from vlbpe_jax.eval import report
from vlbpe_jax.eval import scene_checker


def build_dataset(config, workdir: str):
  d = config.data
  return tfds_builders.build_shapes(
      os.path.join(workdir, "data", "tfds"), resolution=d.resolution, num_train=d.num_train,
      num_validation=d.num_validation, num_test=d.num_test, seed=config.seed)


def data_source(config, workdir: str, split: str):
  """The split's random-access source (grain) of the workdir's shapes dataset."""
  return tfds_builders.data_source(build_dataset(config, workdir), split)


def load_scenes(config, workdir: str, split: str, num: int | None = None) -> dict:
  """The first `num` (default all) examples of a split, in index order, as
  `{"images": uint8 [N, R, R, 3], "objects": [N lists], "captions": [N lists of str],
  "qa": [N lists of {"q", "a"}]}`."""
  source = data_source(config, workdir, split)
  records = sorted((tfds_builders.decode_record(source[i]) for i in range(len(source))),
                   key=lambda r: r["index"])[:len(source) if num is None else int(num)]
  return {"images": np.stack([r["image"] for r in records]),
          "objects": [r["objects"] for r in records],
          "captions": [list(r["captions"]) for r in records],
          "qa": [list(r["qa"]) for r in records]}


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer", "text.model")


def load_tokenizer(workdir: str) -> text_tokenizer.TextTokenizer:
  path = tokenizer_path(workdir)
  if not os.path.exists(path):
    raise ValueError(f"no text tokenizer at {path}: run the 'data' stage first")
  return text_tokenizer.TextTokenizer.load(path)


def _train_tokenizer(config, builder, workdir):
  path = tokenizer_path(workdir)
  if os.path.exists(path):
    return text_tokenizer.TextTokenizer.load(path)
  source = tfds_builders.data_source(builder, "train")
  texts = []
  for i in range(len(source)):
    texts += text_tokenizer.example_texts(tfds_builders.decode_record(source[i]))
  # In-context episodes (lm.text_tasks "icl"): their words ("Input:", "Output:", the symbols)
  # become pieces, so that the episodes and V2L's prompts encode as in training.
  texts += icl.episodes(np.random.default_rng(config.seed), int(config.tokenizer.get("icl_texts", 0)))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return text_tokenizer.TextTokenizer.train(
      texts, vocab_size=config.tokenizer.vocab_size, model_path=path,
      model_type=config.tokenizer.model_type, seed=config.seed)


def _examples_html(records, tok, workdir):
  rows = []
  for k, r in enumerate(records):
    src = report.save_image(workdir, f"data/example_{k}.png", r["image"])
    qa = "<br>".join(f"Q: {html.escape(x['q'])} &rarr; <b>{html.escape(x['a'])}</b>"
                     for x in r["qa"][:4])
    dia = "<br>".join(f"<i>{t['from']}</i>: {html.escape(t['value'])}" for t in r["dialogue"])
    pieces = " ".join(tok.id_to_piece(i) for i in tok.encode(r["caption"]))
    rows.append((report.Markup(report.img_tag(src, width=128)),
                 report.Markup(f"{html.escape(r['caption'])}<br><span class='small'>"
                               f"{html.escape(pieces)}</span>"),
                 report.Markup(qa), report.Markup(dia)))
  return report.table(["test image", "caption (tokenized)", "VQA", "dialogue"], rows)


def run_stage(config, workdir: str) -> dict:
  """Builds the dataset and the tokenizer (reusing both if present); adds the data section."""
  builder = build_dataset(config, workdir)
  tok = _train_tokenizer(config, builder, workdir)
  test = tfds_builders.data_source(builder, "test")
  n_show = min(config.data.report_examples, len(test))
  records = [tfds_builders.decode_record(test[i]) for i in range(n_show)]

  # The checker must read every ground-truth render of what we show (a sanity check here; its
  # accuracy on the full split is in tests and in the scene checker's CLI).
  exact = np.mean([scene_checker.score(r["image"], r["objects"])["all_correct"]
                   for r in records])
  heldout = set(shapes.heldout_compositions())
  frac_heldout = np.mean([any((o["color"], o["shape"]) in heldout for o in r["objects"])
                          for r in records])
  caption_tokens = np.mean([len(tok.encode(r["caption"])) for r in records])
  metrics = {
      "data.num_train": len(tfds_builders.data_source(builder, "train")),
      "data.num_validation": len(tfds_builders.data_source(builder, "validation")),
      "data.num_test": len(test),
      "data.resolution": int(config.data.resolution),
      "data.checker_exact_gt": float(exact),
      "tokenizer.vocab_size": tok.vocab_size,
      "tokenizer.tokens_per_caption": float(caption_tokens),
  }
  specials = ", ".join(f"{k}={v}" for k, v in tok.special_ids.items())
  heldout_txt = ", ".join(f"{c} {s}" for c, s in sorted(heldout))
  body = (
      f"<p>Procedural scenes at {config.data.resolution}&times;{config.data.resolution}: "
      f"{metrics['data.num_train']} train / {metrics['data.num_validation']} validation / "
      f"{metrics['data.num_test']} test examples, stored as TFDS array_record. Held-out "
      f"compositions (test split only): {html.escape(heldout_txt)}; "
      f"{frac_heldout:.0%} of the examples below contain one.</p>"
      f"<p>Text tokenizer: sentencepiece {config.tokenizer.model_type}, "
      f"{tok.vocab_size} pieces; control ids {html.escape(specials)}. "
      f"Scene checker on these ground-truth renders: {exact:.0%} exact.</p>"
      + _examples_html(records, tok, workdir))
  report.add_section(workdir, key="data", title="Data: shapes scenes and text tokenizer",
                     order=10, html=body, metrics=metrics)
  return metrics
