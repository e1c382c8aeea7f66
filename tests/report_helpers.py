"""A small synthetic workdir for the report tests: every summary row's metrics and stored rows,
training logs of every stage, and sections with pictures (no pipeline run)."""

import json
import os

import numpy as np

from vlbpe_jax import fileio
from vlbpe_jax.eval import report

# The seed's claims, made to land on each verdict: (a, b) values.
LM = {"full": 0.60, "no_bpe": 0.40, "single_stage": 0.58}  # n=400: holds, inconclusive
DIT = {"fm": (0.30, 0.02), "mse": (0.50, 0.02), "vq_latent": (0.29, 0.02)}  # (geneval, se)
FID = {"fm": 10.0, "mse": 30.0, "vq_latent": 12.0}
WRONG_PROMPT = {"fm": (0.10, 0.02), "vq_latent": (0.29, 0.02)}  # follows: holds, inconclusive
N_QUESTIONS, N_EPISODES = 400, 50


def _jsonl(path, losses):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for k, loss in enumerate(losses):
      f.write(json.dumps({"step": 10 * (k + 1), "train/loss": loss}) + "\n")


def _episodes(acc, n=N_EPISODES):
  k = int(round(acc * n))
  return [{"pred": "a", "answer": "a" if i < k else "b"} for i in range(n)]


def make_workdir(w, stages=("vq", "lm", "clip", "dit", "v2l")):
  """Writes `stages`' logs, stored rows and report sections into `w`; returns the index path."""
  decay = lambda a, b: list(np.geomspace(a, b, 12))
  img = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3))
  path = None
  if "vq" in stages:
    _jsonl(os.path.join(w, "vq", "metrics.jsonl"), decay(1.0, 0.01))
    src = report.save_image(w, "vq/recon.png", img)
    path = report.add_section(w, "vq", "VQ", 10, report.img_tag(src, width=64),
                              {"vq.psnr_db": 30.0})
  if "lm" in stages:
    metrics = {"lm.vqa_acc.text_only": 0.2}
    _jsonl(os.path.join(w, "text", "metrics.jsonl"), decay(6.0, 3.0))  # stage 0
    for run, acc in LM.items():
      _jsonl(os.path.join(w, "lm", run, "metrics.jsonl"), decay(3.0, 0.5 + acc))
      fileio.write_json(os.path.join(w, "lm", run, "result.json"),
                        {"vqa_acc": acc, "num_questions": N_QUESTIONS})
      metrics[f"lm.vqa_acc.{run}"] = acc
    path = report.add_section(w, "lm", "LM", 40, "<p>lm</p>", metrics)
  if "clip" in stages:
    _jsonl(os.path.join(w, "clip", "metrics.jsonl"), decay(4.0, 0.7))
    path = report.add_section(w, "clip", "CLIP", 50, "<p>clip</p>", {"clip.train_steps": 12})
  if "dit" in stages:
    metrics = {}
    for design, (score, se) in DIT.items():
      _jsonl(os.path.join(w, "dit", design, "metrics.jsonl"), decay(1.5, 0.5))
      wrong, wrong_se = WRONG_PROMPT.get(design, (0.0, 0.0))
      fileio.write_json(os.path.join(w, "dit", design, "result.json"), {"result": {
          "scores": {"all": {"n": 256, "overall": score, "overall_se": se}},
          "wrong_prompt": {"n": 256, "overall": wrong, "overall_se": wrong_se}}})
      metrics.update({f"dit.geneval.{design}": score, f"dit.fid_clip.{design}": FID[design],
                      f"dit.geneval_wrong_prompt.{design}": wrong})
    _jsonl(os.path.join(w, "pixel_decoder", "metrics.jsonl"), decay(0.1, 0.03))
    report.add_section(w, "pixel_decoder", "Pixel decoder", 55, "<p>decoder</p>",
                       {"pixel_decoder.psnr_db": 20.0})
    src = report.save_image(w, "dit/samples_fm.png", img)
    path = report.add_section(w, "dit", "DiT", 60, report.img_tag(src, width=64), metrics)
  if "v2l" in stages:
    _jsonl(os.path.join(w, "text_icl", "metrics.jsonl"), decay(3.0, 1.0))  # V2L's frozen LM
    report.add_section(w, "text_icl", "V2L's LM", 65, "<p>text_icl</p>", {"text_icl.steps": 12})
    _jsonl(os.path.join(w, "v2l", "metrics.jsonl"), decay(0.5, 0.1))
    acc = {"2way_1shot": 0.90, "5way_1shot": 0.24}
    glob_all = {"2way_1shot": 0.70}  # worse than the default: does not hold; 5-way: not run
    fileio.write_json(os.path.join(w, "v2l", "fewshot.json"), {
        "classify": {s: {"way": int(s[0]), "image": _episodes(a)} for s, a in acc.items()},
        "variants": {"global_all": {s: {"way": int(s[0]), "image": _episodes(a)}
                                    for s, a in glob_all.items()}}})
    metrics = {f"v2l.fewshot_acc.{s}": a for s, a in acc.items()}
    metrics.update({f"v2l.chance.{s}": 1.0 / int(s[0]) for s in acc})
    metrics.update({f"v2l.fewshot_acc_global_all.{s}": a for s, a in glob_all.items()})
    path = report.add_section(w, "v2l", "V2L", 70, "<p>v2l</p>", metrics)
  return path
