"""Restoration by the frozen LM reading V2L local tokens: inpaint, outpaint, deblur, shift, rotate.

  python -m vlbpe_jax.v2l.restore --config=configs/tiny.py --workdir=$W

Protocol (`corrupt.py`, settled as the public code): the examples are 10 noisy copies (50%...23%
of the positions replaced by random local tokens) of the CLEAN image's local map, so the
examples carry most clean tokens at each window, as in the code.
- inpaint / outpaint: the image with the centre / bottom half (in tokens: `corrupt.inpaint_mask`
  / `outpaint_mask`, scaled to pixels) painted grey is tokenised; in raster order the LM
  predicts m = 2 tokens from the n = 16 before them, written back;
- deblur / shift / rotation: the corrupted image (`degrade.py`) is tokenised; each window of
  m = 2 is mapped by the LM from the corrupted tokens there (n = m = 2), the examples pairing
  the copies of the corrupted map with the copies of the clean one (same replaced positions).
The LM writes local tokens only: each of its m next tokens is the arg-max of its logits over
the local tokens' LM ids (greedy, as the free decoding of the code, but masked like the
constrained decoding of few-shot classification), so every written token is the LM's own
choice. (Until 2026-12-05 its free greedy output was taken and an id that is not a local token
replaced by the examples' majority: the demo's LM then emitted a non-local id for ~half of the
outputs, and its "gain" was the control's on those; BENCHMARKS.md.) The restored map is
decoded WITHOUT the global tokens (they come from the clean image's CLIP embedding).
Gain = PSNR(restored, clean) - PSNR(decoded corrupted map, clean), in dB, averaged over the
first `v2l.restore_images` test images: both sides pass through the same tokenizer, so the
gain is what the LM's predictions add, not the tokenizer's reconstruction error (the corrupted
pixels' PSNR is stored too).

Control (`predictor="majority"`): every window gets the most frequent output of its 10
examples at each offset, i.e. what a perfect in-context copier would write, with no LM. Its
gain is what the tokenizer lets restoration reach; the LM's gain against it is what the LM
earns. (A tokenizer that reconstructs worse than the corruption, or whose codebook collapsed,
leaves no gain to either.)
"""


from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from vlbpe_jax import cli
from vlbpe_jax import fileio
from vlbpe_jax.lm import generate
from vlbpe_jax.v2l import codebook
from vlbpe_jax.v2l import corrupt
from vlbpe_jax.v2l import degrade
from vlbpe_jax.v2l import prompts
from vlbpe_jax.v2l import train
from vlbpe_jax.vq import metrics as vq_metrics

TASKS = ("inpaint", "outpaint", "deblur", "shift", "rotate")
GREY = 128


PREDICTORS = ("lm", "majority")


def _majority(outputs, m: int) -> np.ndarray:
  """outputs `[B, K, m']` -> `[B, m]`: each offset's most frequent token over the K examples
  (smallest id on ties); offsets past m' (a window cut by the map's end) get 0."""
  out = np.zeros((outputs.shape[0], m), np.int64)
  for b, j in np.ndindex(outputs.shape[0], min(m, outputs.shape[2])):
    vals, counts = np.unique(outputs[b, :, j], return_counts=True)
    out[b, j] = vals[np.argmax(counts)]
  return out


def majority_predictor(*, m: int = 2):
  """`predict(contexts, inputs, outputs)` of corrupt.py without an LM: each of the m outputs
  is the examples' most frequent token at that offset (the control of the module docstring)."""
  if m < 1:
    raise ValueError(f"m={m}: expected >= 1")

  def predict(contexts, inputs, outputs):
    del contexts, inputs
    return _majority(np.asarray(outputs), m)
  return predict


# Prompts per generate call of the LM predictor: all windows of the deblur / shift / rotation
# maps are independent (the demo's 16 x 16 maps, 8 images: 1024 prompts of 265 ids, the public
# code's instruction included), so they go in calls of this many rows; the painting tasks'
# write-back takes one call per window for all images (8 rows of 419 ids).
PREDICT_BATCH = 256


def lm_predictor(lm: train.TextLM, lm_ids, *, m: int = 2, batch_size: int = PREDICT_BATCH):
  """`predict(contexts, inputs, outputs)` of corrupt.py: local indices in and out; the LM
  reads the matching LM ids and writes m local tokens per row: greedy decoding
  (`lm/generate.generate`) with every id that is not a local token's masked out (`allowed`),
  `batch_size` rows per call (each row's tokens are what it gets alone, up to float order)."""
  lm_ids = np.asarray(lm_ids)
  vocab = int(lm.model.config.vocab_size)
  to_local = codebook.lm_to_local_table(lm_ids, vocab)  # raises on ids outside the LM
  allowed = to_local >= 0
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: expected >= 1")

  def predict(contexts, inputs, outputs):
    rows = [prompts.restoration_prompt(lm.tok, [(lm_ids[x], lm_ids[y]) for x, y in zip(xs, ys)],
                                       lm_ids[np.asarray(c)])
            for c, xs, ys in zip(contexts, inputs, outputs)]
    out = []
    for start in range(0, len(rows), batch_size):
      ids, mask = generate.left_pad(rows[start:start + batch_size])
      toks, _ = generate.generate(lm.model, lm.params, ids, mask, jax.random.PRNGKey(0),
                                  max_new_tokens=m, allowed=allowed)
      out.append(np.asarray(jax.device_get(toks)))
    return to_local[np.concatenate(out)]
  return predict


def text_only(lm: train.TextLM, lm_ids, *, num: int, seed: int, ns=(2, 16), m: int = 2) -> dict:
  """The text-only control of restoration: `num` in-context denoising tasks per n of `ns`
  (`data/icl.denoise_task`: the restoration prompt, 10 examples at the protocol's rates, on
  random local tokens, no image) -> {"n2": {"lm": acc, "majority": acc}, ...}, the share of
  tasks whose m outputs are all the clean ones, written by the LM (`lm_predictor`) and by the
  majority vote. What the LM can restore in context at all, beside what it does on images."""
  from vlbpe_jax.data import icl  # pylint: disable=g-import-not-at-top
  if num < 1:
    raise ValueError(f"num={num}: expected >= 1")
  preds = {"lm": lm_predictor(lm, lm_ids, m=m), "majority": majority_predictor(m=m)}
  out = {}
  for n in ns:
    rng = np.random.default_rng([seed, n])
    tasks = [icl.denoise_task(rng, np.arange(len(lm_ids)), m=m, ns=(n,)) for _ in range(num)]
    batch = (np.asarray([t["query"] for t in tasks]),
             np.asarray([[x for x, _ in t["examples"]] for t in tasks]),
             np.asarray([[y for _, y in t["examples"]] for t in tasks]))
    answers = np.asarray([t["answer"] for t in tasks])
    out[f"n{n}"] = {name: float(np.mean(np.all(predict(*batch) == answers, axis=1)))
                    for name, predict in preds.items()}
  return out


def corrupt_images(task: str, images, mask=None, factor: int = 1):
  """uint8 [N, R, R, 3] -> the task's corrupted input (grey where `mask` [h, w] says, for the
  painting tasks; `factor` pixels per token)."""
  if task in ("inpaint", "outpaint"):
    pix = np.kron(mask, np.ones((factor, factor), bool))  # [R, R]
    out = np.array(images)
    out[:, pix] = GREY
    return out
  if task == "deblur":
    return degrade.gaussian_blur(images, sigma=1.5)
  if task == "shift":
    return degrade.shift(images, images.shape[1] // 8, images.shape[2] // 8)
  if task == "rotate":
    return degrade.rotate(images, 10.0)
  raise ValueError(f"task={task!r}: expected one of {TASKS}")


def run(ctx: train.Context, params, *, num: int, seed: int, predictor: str = "lm") -> dict:
  """Every task on the first `num` test images: {task: {"gain_db", "psnr_restored",
  "psnr_corrupted", "images": (clean, corrupted, restored) uint8}}. `predictor`: "lm" (the
  frozen LM) or "majority" (the control); both see the same corrupted copies."""
  if num < 1:
    raise ValueError(f"num={num}: expected >= 1")
  if predictor not in PREDICTORS:
    raise ValueError(f"predictor={predictor!r}: expected one of {PREDICTORS}")
  clean = ctx.test["images"][:num]
  s = ctx.s
  clean_maps = train.encode_ids(s, params, clean)  # [N, h, w]
  h, w = clean_maps.shape[1:]
  factor = clean.shape[1] // h
  vocab = np.arange(len(ctx.books.lm_ids))
  predict = (lm_predictor(ctx.lm, ctx.books.lm_ids) if predictor == "lm"
             else majority_predictor())
  g = ctx.global_emb(ctx.test_tokens[:num])
  out = {}
  for t, task in enumerate(TASKS):
    rng = np.random.default_rng([seed, t])
    mask = (corrupt.inpaint_mask(h, w) if task == "inpaint" else corrupt.outpaint_mask(h, w)
            if task == "outpaint" else None)
    bad = corrupt_images(task, clean, mask, factor)
    bad_maps = train.encode_ids(s, params, bad)
    # Every image's copies (drawn in image order), then all images restored together.
    if mask is not None:
      copies = np.stack([corrupt.corrupted_copies(rng, c, vocab) for c in clean_maps])
      restored = corrupt.restore_masked(predict, bad_maps, mask, copies, n=16, m=2)
    else:
      pairs = [corrupt.corrupted_copies(rng, c, vocab, paired=b)
               for c, b in zip(clean_maps, bad_maps)]
      restored = corrupt.restore_same_positions(predict, bad_maps,
                                                np.stack([p[1] for p in pairs]),
                                                np.stack([p[0] for p in pairs]), m=2)
    images = train.decode_ids(s, params, restored, g, False)
    bad_dec = train.decode_ids(s, params, bad_maps, g, False)
    per = lambda x: [vq_metrics.psnr_db(clean[i:i + 1], x[i:i + 1]) for i in range(num)]  # noqa: E731
    p_rest, p_bad = per(images), per(bad_dec)
    out[task] = {"gain_db": float(np.mean(np.subtract(p_rest, p_bad))),
                 "psnr_restored": p_rest, "psnr_corrupted": p_bad,
                 "psnr_corrupted_pixels": per(bad), "images": (clean, bad, images)}
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  jax.config.update("jax_threefry_partitionable", True)
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  ctx = train.load_context(config, workdir)
  state = train.restore_state(ctx.s)
  res = run(ctx, state["params"], num=int(config.v2l.restore_images), seed=int(config.seed),
            predictor=flags.FLAGS.predictor)
  print(fileio.dumps_json({t: {k: v for k, v in r.items() if k != "images"}
                           for t, r in res.items()}))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/tiny.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Pipeline directory with a trained V2L (workdir/v2l).")
  flags.DEFINE_enum("predictor", "lm", PREDICTORS, "lm: the frozen LM; majority: the control "
                    "(each window's most frequent example output, no LM).")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
