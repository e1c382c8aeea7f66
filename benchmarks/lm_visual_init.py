"""Levers for the unified LM's reading of the image, one `full` run each on a finished demo.

Does initialising the visual rows from the VQ codebook make it read colour sooner? Does a loss
on the image tokens (each visual row then gets a gradient of its own at every occurrence), 2D
positions or another split of the steps between the stages?

  python benchmarks/lm_visual_init.py --src=runs/long --out=/tmp/init_normal --init=normal
  python benchmarks/lm_visual_init.py --src=runs/long --out=/tmp/init_codebook --init=codebook
  python benchmarks/lm_visual_init.py --src=runs/long --out=/tmp/img_loss --image_loss=0.5
  python benchmarks/lm_visual_init.py --src=runs/long --out=/tmp/p2d --config.lm.positions=2d

`--src` is a finished demo workdir (data, tokenizer, vq, bpe and the stage-0 LM `text`);
`--out` gets symlinks to its data/tokenizer/vq/bpe folders and a copy of `text`, and the lm
stage trains only the `--run` run (default `full`) of `--config` there (its stages and the
evaluation). Fewer VQA questions per training example (no answer to copy from the text):

  python benchmarks/lm_visual_init.py --src=runs/long --out=/tmp/q2 --config.lm.vqa_questions=2

`--init=normal` is the pipeline's own init (rows ~ N(0, init_std)); `--init=codebook`: base code
c's row is a fixed Gaussian projection of its (centred) VQ codebook vector, a BPE token's row the
mean of its cells' vectors (`VisualBPE.geometry.codes`), all scaled to a mean row norm of
init_std * sqrt(width) (the text rows' scale). `--image_loss=w` adds w x the mean next-token
cross-entropy on the image tokens (targets in the visual table) to the answer loss; the metrics'
`loss` stays the answer loss. `--config.lm.*` overrides apply to the run. Prints VQA, the wrong-image control, held-out and
per-type accuracies (BENCHMARKS.md, "Unified LM: what the model reads").
"""

import functools
import os
import shutil
import time

from absl import app
from absl import flags
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from vlbpe_jax.bpe import VisualBPE
from vlbpe_jax.lm import stage as lm_stage
from vlbpe_jax.lm import train as lm_train
from vlbpe_jax.vq import tokenizer as vq_tokenizer

SRC = flags.DEFINE_string("src", None, "finished workdir of --config (lm stage done)", required=True)
OUT = flags.DEFINE_string("out", None, "work directory of this run", required=True)
INIT = flags.DEFINE_enum("init", "normal", ["normal", "codebook"], "visual rows' init")
RUN = flags.DEFINE_enum("run", "full", lm_train.RUNS, "which run of the lm stage to train")
IMAGE_LOSS = flags.DEFINE_float("image_loss", 0.0, "weight of the image tokens' loss (0: none)")
CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/tiny.py:long", "config file (the budget its BENCHMARKS rows were measured at)")


def codebook_vectors(workdir: str) -> np.ndarray:
  """`[V + merges, D]`: each base code's VQ codebook vector (centred), each BPE token the mean
  over its cells of their base codes' vectors."""
  book = np.asarray(vq_tokenizer.Tokenizer.from_workdir(workdir).params["quantize"]["embedding"],
                    np.float64)
  bpe = VisualBPE.load(os.path.join(workdir, "bpe", "bpe.json"))
  if bpe.base_vocab_size != len(book):
    raise ValueError(f"bpe.json base_vocab_size={bpe.base_vocab_size}: expected the VQ's "
                     f"{len(book)} codes")
  book -= book.mean(0)
  return np.stack([book[bpe.geometry.codes(t)].mean(0) for t in range(bpe.vocab_size)])


def loss_with_image_tokens(params, batch, key, *, model, weight):
  """`lm_train.loss_fn` + weight x mean cross-entropy of the targets in the visual table."""
  logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"], branch_ids=batch.get("branch_ids"),
                       rngs={"dropout": key})
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, T]
  w = batch["loss_mask"].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  answers = jnp.sum(ce * w) / n
  v = ((batch["targets"] >= model.config.text_vocab) & (batch["segment_ids"] > 0)).astype(
      jnp.float32)
  image = jnp.sum(ce * v) / jnp.maximum(jnp.sum(v), 1.0)
  acc = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * w) / n
  return answers + weight * image, {"loss": answers, "image_loss": image, "token_acc": acc,
                                    "loss_tokens": jnp.sum(w)}


def _prepare(src: str, out: str):
  if os.path.exists(out):
    return
  os.makedirs(os.path.join(out, "lm"))
  for d in ("data", "tokenizer", "vq", "bpe"):
    os.symlink(os.path.abspath(os.path.join(src, d)), os.path.join(out, d))
  shutil.copytree(os.path.join(src, "text"), os.path.join(out, "text"))


def main(argv):
  del argv
  _prepare(SRC.value, OUT.value)
  config = CONFIG.value
  config.lm.runs = (RUN.value,)
  if IMAGE_LOSS.value:
    lm_train.loss_fn = functools.partial(loss_with_image_tokens, weight=IMAGE_LOSS.value)
  if INIT.value == "codebook":
    vecs = codebook_vectors(OUT.value)
    train_run = lm_train.train_run

    def with_codebook_rows(config, workdir, run, tok, source, visual, num_vq, num_bpe,
                           text_params, mesh, **kw):
      c = lm_train.make_model(config, tok, num_vq, num_bpe).config
      proj = np.random.default_rng(0).normal(size=(vecs.shape[1], c.width)) / np.sqrt(
          vecs.shape[1])
      rows = vecs @ proj
      rows *= c.init_std * np.sqrt(c.width) / np.linalg.norm(rows, axis=1).mean()
      table = np.zeros((c.visual_vocab, c.width), np.float32)
      table[:len(rows)] = rows  # rows past the vocabulary (padding) stay zero
      params = {**text_params, "visual_embed": jnp.asarray(table)}
      return train_run(config, workdir, run, tok, source, visual, num_vq, num_bpe, params,
                       mesh, **kw)
    lm_train.train_run = with_codebook_rows  # lm/stage.py calls train.train_run
  t0 = time.perf_counter()
  m = lm_stage.run_stage(config, OUT.value)
  print(f"init={INIT.value} image_loss={IMAGE_LOSS.value}: lm stage {time.perf_counter() - t0:.0f} s")
  r = RUN.value
  for k in (f"lm.vqa_acc.{r}", f"lm.vqa_acc_wrong_image.{r}", f"lm.vqa_acc_heldout.{r}",
            f"lm.caption_precision.{r}", f"lm.caption_recall.{r}"):
    print(f"  {k}: {m[k]:.3f}")
  for kind in (f"lm.vqa_acc_by_type.{r}.", f"lm.vqa_acc_by_type_wrong_image.{r}."):
    print(f"  {kind}", {k[len(kind):]: round(v, 2) for k, v in m.items() if k.startswith(kind)})


if __name__ == "__main__":
  app.run(main)
