"""Pipeline stages `pixel_decoder` and `dit`: BLIP3-o's generator and the seed's design study,
judged by the scene checker.

`pixel_decoder` (`run_decoder_stage`; reads `data`, `clip`): the pixel decoder (`decoder.py`)
trained on the training split's (CLIP features, image) pairs, into `$W/pixel_decoder/`; its
reconstruction PSNR on the test split. A stage of its own: it reads nothing of the LM, so it
trains beside Being-VL's runs and a change of the DiT's or the LM's settings does not retrain it.

`dit` (`run_stage`): from the frozen unified LM (`lm/full`), the CLIP (`clip`), the VQ (`vq`)
and the pixel decoder, on one budget (`dit.total_steps` x `dit.batch_size` for each design):
  1. the decoder's ceiling: the scene checker on decoder(CLIP(real test image));
  2. each design of `dit.designs` (`train.DESIGNS`: fm, mse, vq_latent) trained, then sampled
     (`dit.num_samples` per prompt, Euler `dit.sample_steps` steps, guidance `dit.guidance`)
     for the first `dit.num_eval` test captions;
  3. GenEval-style scores (`eval/generation.py`) of the decoded samples against the prompt's
     scene, over all prompts, single-object prompts, and prompts with / without a held-out
     colour-shape composition, and against the next prompt's scene
     (`generation.wrong_prompt_control`: a generator that ignores its prompt scores the same on
     both); diversity (mean pairwise distance of each prompt's samples in CLIP patch-feature
     space, standardised); a Fréchet distance between CLIP embeddings of the generated and the
     real test images.
Writes `$W/dit/<design>/` (checkpoints, metrics.jsonl, result.json keyed by the config) and the
report section. Reads `config.dit.*`, `config.clip.*`, `config.lm.*`, `config.seed`.
"""

import html
import os

import jax
import numpy as np

from vlbpe_jax import fileio
from vlbpe_jax import loop
from vlbpe_jax import manifest
from vlbpe_jax.clip import train as clip_train
from vlbpe_jax.data import stage as data_stage
from vlbpe_jax.dit import decoder as decoder_lib
from vlbpe_jax.dit import targets
from vlbpe_jax.dit import train
from vlbpe_jax.eval import generation
from vlbpe_jax.eval import report
from vlbpe_jax.lm import evaluate as lm_evaluate
from vlbpe_jax.vq import metrics as vq_metrics

LABEL = {"fm": "CLIP features + flow matching (BLIP3-o)",
         "mse": "CLIP features + MSE regression",
         "vq_latent": "VQ latents + flow matching (VAE + FM)"}


def _groups(objects):
  """Prompt subsets: name -> boolean mask over the prompts."""
  held = np.array([lm_evaluate.has_heldout(o) for o in objects])
  return {"all": np.ones(len(objects), bool), "single": np.array([len(o) == 1 for o in objects]),
          "heldout": held, "seen": ~held}


def _scores(images, objects):
  """images [P, S, R, R, 3] -> per-group summaries and the per-image rows."""
  rows = [[generation.image_scores(im, o) for im in ims] for ims, o in zip(images, objects)]
  out = {}
  for name, mask in _groups(objects).items():
    out[name] = generation.summarise([r for i, rs in enumerate(rows) if mask[i] for r in rs])
  return out, rows


class _Context:
  """Data, the frozen models and the CLIP features, loaded once."""

  def __init__(self, config, workdir, backbone: bool = True):
    self.config, self.workdir = config, workdir
    self.mesh = decoder_lib.make_mesh(config)
    self.train = data_stage.load_scenes(config, workdir, "train")
    test = data_stage.load_scenes(config, workdir, "test")
    n = min(int(config.dit.num_eval), len(test["images"]))
    self.test, self.prompts = test, [c[0] for c in test["captions"][:n]]
    self.objects = test["objects"][:n]
    self.clip, self.clip_params, _ = clip_train.restore(config, workdir, self.mesh)
    self.train_feats = self.clip_grid(self.train["images"])
    self.backbone = train.load_backbone(config, workdir, self.mesh) if backbone else None

  def clip_grid(self, images):
    return clip_train.grid_features(self.clip, self.clip_params, images, self.mesh,
                                    int(self.config.clip.grid))

  def clip_embed(self, images):
    return clip_train.image_embeddings(self.clip, self.clip_params, images, self.mesh)


def _design(ctx, design, dec, dec_params):
  """Trains and evaluates one design; returns its result dict and the sample images."""
  config = ctx.config
  c = config.dit
  if design == "vq_latent":
    from vlbpe_jax.vq import tokenizer as vq_tokenizer  # pylint: disable=g-import-not-at-top
    vq = vq_tokenizer.Tokenizer.from_workdir(ctx.workdir, mesh=ctx.mesh)
    x0 = train.vq_latents(vq, vq.encode(ctx.train["images"]))
  else:
    x0 = ctx.train_feats
  s = train.setup(config, ctx.workdir, design, shape=x0.shape[1:],
                  stats=targets.stats_of(x0), backbone=ctx.backbone, mesh=ctx.mesh)
  state = train.train(config, s, ctx.train["captions"], x0)
  key = jax.random.fold_in(jax.random.key(config.seed), 1000 + train.DESIGNS.index(design))
  gen = train.generate(config, s, state["params"], ctx.prompts, key,
                       num_samples=int(c.num_samples))  # [P, S, H, W, C]
  flat = gen.reshape((-1,) + gen.shape[2:])
  if design == "vq_latent":
    images = vq.decode(train.vq_codes_of(vq, flat))
  else:
    images = decoder_lib.decode(dec, dec_params, flat)
  images = images.reshape(gen.shape[:2] + images.shape[1:])  # [P, S, R, R, 3]
  scores, rows = _scores(images, ctx.objects)
  control = generation.wrong_prompt_control(images, ctx.objects)
  feats = decoder_lib.standardise(dec, ctx.clip_grid(images.reshape((-1,) + images.shape[2:])))
  res = {"scores": scores, "wrong_prompt": control,
         "diversity": generation.diversity(feats.reshape(gen.shape[:2] + (-1,))),
         "fid_clip": generation.frechet_distance(
             ctx.clip_embed(images.reshape((-1,) + images.shape[2:])),
             ctx.clip_embed(ctx.test["images"])),
         "train_seconds": loop.train_seconds(os.path.join(s.run_dir, "ckpt")),
         "verdicts": [[r["overall"] for r in rs] for rs in rows]}
  return res, images


def _overall(summary):
  return float("nan") if summary is None else summary["overall"]


def _result_key(config):
  d = manifest.config_dict(config)
  return {k: d.get(k) for k in ("seed", "data", "dit", "clip", "lm")}


def _sample_grid(ctx, images, k):
  """Rows: the real test image, then the samples of its prompt."""
  real = ctx.test["images"][:k, None]
  return report.image_grid(np.concatenate([real, images[:k]], axis=1).reshape(
      (-1,) + images.shape[2:]), ncols=images.shape[1] + 1)


def run_decoder_stage(config, workdir: str) -> dict:
  """Pipeline stage `pixel_decoder`: trains (or resumes) the CLIP-feature -> pixel decoder on the
  training split; its PSNR on the test split and a picture of real / decoded test images."""
  c = config.dit.decoder
  ctx = _Context(config, workdir, backbone=False)
  dec, state = decoder_lib.train_decoder(config, workdir, ctx.train_feats, ctx.train["images"],
                                         mesh=ctx.mesh)
  real = ctx.test["images"]
  recon = decoder_lib.decode(dec, state["params"], ctx.clip_grid(real))
  metrics = {"pixel_decoder.steps": int(c.total_steps),
             "pixel_decoder.psnr_db": vq_metrics.psnr_db(real, recon),
             "pixel_decoder.train_seconds": loop.train_seconds(os.path.join(dec.run_dir, "ckpt"))}
  shown = min(8, len(real))
  src = report.save_image(workdir, "pixel_decoder/test.png", report.image_grid(
      np.concatenate([real[:shown], recon[:shown]]), ncols=shown))
  g = int(config.clip.grid)
  body = (f"<p>BLIP3-o turns generated CLIP features into pixels with a pretrained diffusion "
          f"decoder; ours is a convolutional decoder (the VQ-GAN's decoder architecture) from "
          f"the CLIP's {g}&times;{g} patch-feature grid, standardised, to "
          f"{int(config.data.resolution)}&times;{int(config.data.resolution)} pixels, trained "
          f"{int(c.total_steps)} steps &times; {int(c.batch_size)} by L2 on the training split's "
          f"(CLIP(image), image) pairs. PSNR of decoder(CLIP(test image)) against the image, "
          f"{len(real)} test images: {metrics['pixel_decoder.psnr_db']:.2f} dB. Top row: test "
          f"images; bottom: decoded from their CLIP features. The DiT's designs on CLIP features "
          f"are decoded by it (next section, with its ceiling by the scene checker).</p>"
          + report.img_tag(src, width=shown * 96))
  metrics = {k: v for k, v in metrics.items() if np.isfinite(v)}
  report.add_section(workdir, key="pixel_decoder", title="BLIP3-o pixel decoder: CLIP features "
                     "→ pixels", order=55, html=body, metrics=metrics)
  return metrics


def run_stage(config, workdir: str) -> dict:
  c = config.dit
  ctx = _Context(config, workdir)
  # 1. The decoder's ceiling.
  dec, dec_params = decoder_lib.restore(config, workdir, ctx.mesh)
  real = ctx.test["images"][:len(ctx.prompts)]
  recon = decoder_lib.decode(dec, dec_params, ctx.clip_grid(real))
  ceiling, _ = _scores(recon[:, None], ctx.objects)
  ceiling_control = generation.wrong_prompt_control(recon[:, None], ctx.objects)
  metrics = {"dit.geneval_upper_bound": ceiling["all"]["overall"],
             "dit.geneval_upper_bound_single": ceiling["single"]["overall"],
             "dit.geneval_upper_bound_wrong_prompt": _overall(ceiling_control),
             "dit.num_prompts": len(ctx.prompts), "dit.num_samples": int(c.num_samples)}
  results, sections = {}, []
  for design in c.designs:
    path = os.path.join(workdir, "dit", design, "result.json")
    key = _result_key(config)
    stored = fileio.read_json(path, what="DiT result") if os.path.exists(path) else None
    if stored is not None and stored.get("key") == key:
      res = stored["result"]
      images = np.load(os.path.join(workdir, "dit", design, "samples.npy"))
      if "wrong_prompt" not in res:  # stored before the control existed: from its samples
        res["wrong_prompt"] = generation.wrong_prompt_control(images, ctx.objects)
        fileio.write_json(path, {"key": key, "result": res})
    else:
      res, images = _design(ctx, design, dec, dec_params)
      fileio.save_npy(os.path.join(workdir, "dit", design, "samples.npy"), images)
      fileio.write_json(path, {"key": key, "result": res})
    results[design] = res
    sc = res["scores"]
    metrics.update({
        f"dit.geneval.{design}": sc["all"]["overall"],
        f"dit.geneval_wrong_prompt.{design}": _overall(res["wrong_prompt"]),
        f"dit.geneval_single.{design}": sc["single"]["overall"],
        f"dit.geneval_heldout.{design}": sc["heldout"]["overall"],
        f"dit.geneval_seen.{design}": sc["seen"]["overall"],
        f"dit.diversity.{design}": res["diversity"],
        f"dit.fid_clip.{design}": res["fid_clip"],
        **{f"dit.geneval_{k}.{design}": sc["all"][k] for k in generation.CRITERIA}})
    if np.isfinite(res.get("train_seconds", np.nan)):
      metrics[f"dit.train_seconds.{design}"] = res["train_seconds"]
    k = min(int(c.report_prompts), len(ctx.prompts))
    src = report.save_image(workdir, f"dit/samples_{design}.png", _sample_grid(ctx, images, k))
    verdicts = [(html.escape(ctx.prompts[i]),
                 " ".join(f"{v:.2f}" for v in res["verdicts"][i])) for i in range(k)]
    sections.append(
        f"<h3>{html.escape(LABEL[design])}</h3><p>Each row: the real test image, then "
        f"{int(c.num_samples)} samples for its caption.</p>"
        f"{report.img_tag(src, width=(int(c.num_samples) + 1) * 96)}"
        + report.table(("prompt", "checker score of each sample (object, colour, count, "
                        "position averaged)"), verdicts))
  def fmt(sc):  # NaN (stored as null): no prompt in the subset, or one image (no SE)
    if not sc["n"]:
      return "no prompts"
    se = sc["overall_se"]
    return (f"{sc['overall']:.3f}" + (f" ± {se:.3f}" if se is not None and np.isfinite(se)
                                       else "") + f" (n={sc['n']})")
  control = lambda sc: fmt(sc) if sc else "&ndash;"  # noqa: E731
  rows = [(LABEL[d], fmt(r["scores"]["all"]), control(r["wrong_prompt"]),
           fmt(r["scores"]["single"]), fmt(r["scores"]["seen"]), fmt(r["scores"]["heldout"]),
           *[r["scores"]["all"][k] for k in generation.CRITERIA],
           f"{r['diversity']:.3f}", f"{r['fid_clip']:.2f}") for d, r in results.items()]
  rows.append(("decoder(CLIP(real image)): the ceiling", fmt(ceiling["all"]),
               control(ceiling_control), fmt(ceiling["single"]), fmt(ceiling["seen"]),
               fmt(ceiling["heldout"]), *[ceiling["all"][k] for k in generation.CRITERIA], "",
               ""))
  body = (f"<p>BLIP3-o on the shapes data: {int(c.num_queries)} learnable queries after the "
          f"prompt <code>{html.escape(c.prompt_template)}</code> run through the frozen unified "
          f"LM; its final hidden states at the queries condition a DiT ({c.variant}) trained "
          f"{int(c.total_steps)} steps x {int(c.batch_size)} per design. Scores by the scene "
          f"checker on {len(ctx.prompts)} test captions x {int(c.num_samples)} samples "
          "(GenEval-style: object, colour, count, position; overall = their mean; ± standard "
          "error over images). Wrong prompt: the same images scored against the next "
          "prompt's scene, the control a generator must beat to be following its prompts "
          "(real images score 1 against their own prompt and well above 0 against another's). "
          "Diversity: mean pairwise distance of a prompt's samples in "
          "standardised CLIP patch-feature space. FID (CLIP): Fréchet distance between CLIP "
          "image embeddings of the samples and of the real test images.</p>"
          + report.table(("design", "overall (all)", "wrong prompt (control)",
                          "single object", "seen compositions", "held-out compositions",
                          *generation.CRITERIA, "diversity", "FID (CLIP)"), rows)
          + "".join(sections))
  # A subset without prompts (e.g. no held-out composition among a few) has no score.
  metrics = {k: v for k, v in metrics.items() if v is not None and np.isfinite(v)}
  report.add_section(workdir, key="dit", title="BLIP3-o generation (DiT)", order=60,
                     html=body, metrics=metrics)
  return metrics
