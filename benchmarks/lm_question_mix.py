"""Which VQA questions does the unified LM learn to answer from the image, and from which mix?

One run of the lm stage's training on a finished demo workdir, with the VQA examples reduced
to some question types (`only=`), some types repeated in an image's list (`boost=types:n`;
with `vqa_questions=1` they are drawn n x as often) and/or fresh weights instead of stage 0's text model
(`fresh=1`); then each test (and train) question asked alone after its image, as evaluation
asks it, scored teacher-forced (the answer's tokens are all the argmax), per question type,
plus colour on one-object images (`color1`):

  python benchmarks/lm_question_mix.py OUT RUN [only=color,shape] [boost=color,shape:3] [fresh=1]
      [lm_field=value ...]
  python benchmarks/lm_question_mix.py /tmp/q_color single_stage fresh=1 only=color \
      'stage_tasks=(("vqa",),("vqa",),("vqa",))'

OUT gets symlinks to the data/tokenizer/vq/bpe folders of SRC (default runs/long, a workdir of
`configs/tiny.py:long`, the config this script runs; `src=`)
and a copy of its stage-0 model `text`; RUN is one of lm/train.py:RUNS; other `k=v` set
`config.lm.k` (python literals; `model.k=v` sets `config.lm.model`, `data.k=v` `config.data.k`:
give SRC's own data settings, e.g. `data.num_train=8000`, or its data is made again here). A
rerun with the same OUT evaluates the finished checkpoint. BENCHMARKS.md, "Unified LM: what the model reads".
"""

import ast
import collections
import importlib.util
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vlbpe_jax.data import pipeline
from vlbpe_jax.data import shapes
from vlbpe_jax.data import stage as data_stage
from vlbpe_jax.data import tfds_builders
from vlbpe_jax.lm import evaluate
from vlbpe_jax.lm import sequences
from vlbpe_jax.lm import train

TYPES = ("all", "count", "color", "color1", "shape", "size", "position", "existence")


def main(out, run, *args):
  kv = dict(a.split("=", 1) for a in args)
  fresh = kv.pop("fresh", "0") == "1"
  only = [t for t in kv.pop("only", "").split(",") if t]
  boost, _, times = kv.pop("boost", "").partition(":")
  boost, times = [t for t in boost.split(",") if t], int(times or 1)
  src = kv.pop("src", "runs/long")
  spec = importlib.util.spec_from_file_location("cfg", "configs/tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("long")  # the budget its BENCHMARKS rows were measured at
  config.lm.progress = False
  for k, v in kv.items():
    if k.startswith("model."):
      config.lm.model = {**dict(config.lm.model), k[6:]: ast.literal_eval(v)}
    elif k.startswith("data."):  # the SRC workdir's data settings, e.g. data.num_train=8000
      setattr(config.data, k[5:], ast.literal_eval(v))
    else:
      setattr(config.lm, k, ast.literal_eval(v))
  if not os.path.exists(out):
    os.makedirs(os.path.join(out, "lm"))
    for d in ("data", "tokenizer", "vq", "bpe"):
      os.symlink(os.path.abspath(os.path.join(src, d)), os.path.join(out, d))
    shutil.copytree(train.text_dir(src), train.text_dir(out))
  bad = [t for t in only + boost if t not in dict((n, 0) for n, _, _ in shapes.QUESTION_TYPES)]
  if bad:
    raise ValueError(f"only={bad}: expected question types of shapes.QUESTION_TYPES")
  plain = pipeline.format_example
  if only:  # TaskFormatter looks format_example up in its module at every call
    def format_only(example, task, tokenizer, **kw):
      if task == "vqa" and kw.get("rng") is not None:
        example = {**example, "qa": [qa for qa in example["qa"]
                                     if shapes.question_type(qa["q"]) in only]}
      return plain(example, task, tokenizer, **kw)
    pipeline.format_example = format_only
  if boost:  # with lm.vqa_questions=k, the boosted types are drawn `times` x as often
    inner = pipeline.format_example

    def format_boosted(example, task, tokenizer, **kw):
      if task == "vqa" and kw.get("rng") is not None:
        example = {**example, "qa": [qa for qa in example["qa"] for _ in range(
            times if shapes.question_type(qa["q"]) in boost else 1)]}
      return inner(example, task, tokenizer, **kw)
    pipeline.format_example = format_boosted

  tok = data_stage.load_tokenizer(out)
  builder = data_stage.build_dataset(config, out)
  visual, num_vq, num_bpe = sequences.load_visual_tokens(
      out, "vq" if run == "no_bpe" else "bpe", vq_start=train.text_rows(config, tok))
  mesh = train.make_mesh(config)
  source = tfds_builders.data_source(builder, "train")
  t0 = time.perf_counter()
  text = None if fresh else train.pretrain_text(config, out, tok, source, mesh)
  model, trainer, state = train.train_run(config, out, run, tok, source, visual["train"],
                                          num_vq, num_bpe, text, mesh)
  seconds = time.perf_counter() - t0
  forward = jax.jit(lambda p, x, s: model.apply({"params": p}, x, segment_ids=s))
  width, rows = config.lm.seq_len, 64
  res = {}
  for split in ("train", "test"):
    seqs, info = [], []
    for ex in evaluate.first_examples(tfds_builders.data_source(builder, split), 150):
      for qa in ex["qa"]:
        seqs.append(plain(dict(ex, qa=[qa]), "vqa", tok, image_tokens=visual[split]))
        info.append((shapes.question_type(qa["q"]), len(ex["objects"])))
    c = collections.Counter()
    for s0 in range(0, len(seqs), rows):
      x, seg = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
      for r, (ids, _) in enumerate(seqs[s0:s0 + rows]):
        x[r, :len(ids)], seg[r, :len(ids)] = ids, 1
      with trainer.ctx():
        logits = np.asarray(jax.device_get(forward(state["params"], jnp.asarray(x),
                                                   jnp.asarray(seg))))
      for r, (ids, mask) in enumerate(seqs[s0:s0 + rows]):
        pred = logits[r, :len(ids) - 1].argmax(-1)
        ok = bool((pred[mask[1:]] == ids[1:][mask[1:]]).all())
        qtype, objects = info[s0 + r]
        keys = [qtype, "all"] + (["color1"] if qtype == "color" and objects == 1 else [])
        for k in keys:
          c[k] += ok
          c[k + "_n"] += 1
    res[split] = {k: round(c[k] / c[k + "_n"], 2) for k in TYPES if c[k + "_n"]}
  print(f"{run} only={only or 'all'} boost={boost}x{times} fresh={fresh} {kv}: "
        f"{seconds:.0f} s")
  for split, r in res.items():
    print(f"  {split}: {r}")


if __name__ == "__main__":
  main(*sys.argv[1:])
