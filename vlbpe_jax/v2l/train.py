"""Trains the V2L tokenizer on the shapes data: images as tokens of the frozen text LM's vocabulary.

  python -m vlbpe_jax.v2l.train --config=configs/tiny.py --workdir=$W

Needs in `$W`: the `data` stage (tfds shapes, tokenizer), the LM's stage 0 (the `text` stage,
`text/ckpt`: the text-only model, the stand-in for a pretrained LLM) and the CLIP (`clip/ckpt`).
With `lm.text_phases`, V2L's frozen LM is stage 0 continued on in-context episodes (the
`text_icl` stage, `text_icl/ckpt`; this CLI trains it first when missing). Frozen: the LM, the
CLIP and the local table. Steps:
  1. local codebook: every text subword of the LM (`codebook.subword_texts`) embedded by the
     CLIP text tower over prompt templates -> `local_emb` [V, E], an argument of the step
     (`sharded_trainer`'s `frozen`), never a parameter; the trainable projector maps it;
  2. global codebook: the subwords plus the bigrams/trigrams of the frozen LM's greedy
     completion of "a photo of {subword}" (`codebook.ngram_candidates`), CLIP-embedded, kept
     when in the top-`global_filter_k` of more than `global_min_images` training images; an
     image's global tokens are its top-`num_global` entries by cosine to its CLIP embedding;
  3. the V2LTokenizer (encoder, projector, decoder cross-attending to the global entries' CLIP
     text embeddings) trained with L1 + quantisation loss (+ LPIPS when `v2l.perceptual_weights`
     names a weights file) (+ with `v2l.disc_weight > 0` the public code's taming-style GAN:
     `disc_weight` x the adaptive weight at the decoder's conv_out x the generator hinge loss,
     from step `v2l.disc_start`, against vq/discriminator.py's PatchGAN (`v2l.disc_variant`)
     trained with the hinge loss from the same step; v2l/losses.py). With probability
     `v2l.global_dropout` a training image's global tokens are all masked out, so the decoder
     also works without them (PSNR "local").
Adam (0.5, 0.9) as the public code, warm-up + cosine, for the tokenizer (`v2l.lr`) and the
discriminator (`v2l.disc_lr`, same schedule); the discriminator's params and Adam state are in
the train state (`sharded_trainer.Discriminator`: `disc_params`, `disc_opt`), checkpointed and
resumed with it. Writes `$W/v2l/` (orbax `ckpt/`, `metrics.jsonl`, `codebook.npz`) and resumes.
Reads `config.v2l.*`, `config.lm.*` (the text LM), `config.clip.*`, `config.seed`,
`config.mesh`.
"""

import dataclasses
import functools
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from vlbpe_jax import checkpoint
from vlbpe_jax import cli
from vlbpe_jax import fileio
from vlbpe_jax import loop
from vlbpe_jax import manifest
from vlbpe_jax import parallel
from vlbpe_jax import sharded_trainer
from vlbpe_jax.clip import train as clip_train
from vlbpe_jax.data import pipeline
from vlbpe_jax.data import stage as data_stage
from vlbpe_jax.lm import generate as lm_generate
from vlbpe_jax.lm import train as lm_train
from vlbpe_jax.v2l import codebook
from vlbpe_jax.v2l import losses
from vlbpe_jax.v2l import model as model_lib
from vlbpe_jax.vq import discriminator as disc_lib
from vlbpe_jax.vq import metrics as vq_metrics
from vlbpe_jax.vq import perceptual

# Config keys a checkpoint must agree on before it is restored (the CLIP's and the text LM's
# too: they make the codebooks); "v2l" stands for its fields less EVAL_FIELDS (`must_match`).
MUST_MATCH = ("seed", "data", "v2l", "clip", "lm.seed", "lm.variant", "lm.model",
              "lm.text_steps", "lm.text_tasks", "lm.vocab_multiple", "lm.text_phases")
# v2l fields that only the evaluation reads (few-shot, captioning, VQA, restoration): a trained
# tokenizer and its codebooks hold for any value of them, so `python -m vlbpe_jax.v2l.fewshot
# --config.v2l.fewshot_episodes=200` scores a trained V2L on more episodes.
EVAL_FIELDS = ("fewshot_ways", "fewshot_shots", "fewshot_episodes", "fewshot_global",
               "fewshot_batch", "variant_settings", "caption_shots", "vqa_shots",
               "describe_queries", "max_caption_tokens", "restore_images", "restore_text_only")


def must_match(config) -> tuple:
  """`MUST_MATCH` with "v2l" spelled out: its fields but `EVAL_FIELDS` (a new field is in)."""
  return tuple(k for k in MUST_MATCH if k != "v2l") + tuple(
      f"v2l.{k}" for k in config.v2l if k not in EVAL_FIELDS)


def check_config(config):
  c = config.v2l
  for name in ("batch_size", "total_steps", "log_every", "ckpt_every", "num_global",
               "global_filter_k", "restore_images", "restore_text_only"):
    if int(c[name]) < 1:
      raise ValueError(f"v2l.{name}={c[name]!r}: expected a positive int")
  if not 1 <= int(c.fewshot_global) <= int(c.num_global):
    raise ValueError(f"v2l.fewshot_global={c.fewshot_global!r}: expected 1..v2l.num_global="
                     f"{c.num_global}")
  if int(c.global_min_images) < 0:
    raise ValueError(f"v2l.global_min_images={c.global_min_images!r}: expected >= 0")
  if not float(c.lr) > 0:
    raise ValueError(f"v2l.lr={c.lr!r}: expected > 0")
  if not 0.0 <= float(c.global_dropout) < 1.0:
    raise ValueError(f"v2l.global_dropout={c.global_dropout!r}: expected in [0, 1)")
  if not float(c.disc_weight) >= 0:
    raise ValueError(f"v2l.disc_weight={c.disc_weight!r}: expected >= 0 (0: no GAN)")
  if float(c.disc_weight) > 0:
    if c.disc_variant not in disc_lib.DISC_VARIANTS:
      raise ValueError(f"v2l.disc_variant={c.disc_variant!r} unknown; expected one of "
                       f"{sorted(disc_lib.DISC_VARIANTS)}")
    if int(c.disc_start) < 0 or not float(c.disc_lr) > 0:
      raise ValueError(f"v2l.disc_start={c.disc_start!r}, v2l.disc_lr={c.disc_lr!r}: expected "
                       ">= 0 and > 0")
  if float(c.perceptual_weight) > 0 and not c.perceptual_weights:
    raise ValueError(f"v2l.perceptual_weight={c.perceptual_weight} needs a weights file in "
                     "v2l.perceptual_weights (no random perceptual weights); set the weight to 0")


def run_dir(workdir):
  return os.path.join(workdir, "v2l")


# --- The frozen models ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextLM:
  """The frozen text LM of stage 0: model, params (on the mesh), tokenizer."""
  model: object
  params: object
  tok: object


def train_text_lm(config, workdir: str):
  """With `lm.text_phases`: trains (or resumes, or finds finished) V2L's frozen LM, stage 0
  continued on those phases (`lm/train.py:pretrain_icl`, `$W/text_icl`: the pipeline's
  `text_icl` stage); without: nothing (V2L reads stage 0 itself, the `text` stage's)."""
  if not lm_train.text_phases(config):
    return
  tok = data_stage.load_tokenizer(workdir)
  lm_train.pretrain_icl(config, workdir, tok, data_stage.data_source(config, workdir, "train"),
                        lm_train.make_mesh(config))


def load_text_lm(config, workdir: str, mesh) -> TextLM:
  """V2L's frozen LM: stage 0's text model (`lm/train.py:pretrain_text`, `$W/text/ckpt`), or
  with `lm.text_phases` its continuation on them (`train_text_lm`, `$W/text_icl/ckpt`)."""
  tok = data_stage.load_tokenizer(workdir)
  model = lm_train.make_model(config, tok)
  trainer = lm_train.Trainer(config, model, mesh)
  icl = bool(lm_train.text_phases(config))
  plan = lm_train.plan_of(config, "text_icl" if icl else "text")  # last phase: state layout
  path = os.path.join(lm_train.icl_dir(workdir) if icl else lm_train.text_dir(workdir), "ckpt")
  state = checkpoint.restore_latest(path, trainer.abstract_state(plan[-1]), what="text LM",
                                    hint="run the 'text_icl' stage first" if icl else
                                    "run the 'text' stage first")
  if model.config.vocab_size < tok.vocab_size:
    raise ValueError(f"LM vocab {model.config.vocab_size} < tokenizer vocab {tok.vocab_size}: "
                     "the LM does not belong to this tokenizer")
  return TextLM(model, state["params"], tok)


def lm_complete(lm: TextLM, max_new_tokens: int = 2):
  """`prompts (str) -> greedy continuation ids` of the frozen LM (bos + the prompt)."""
  def complete(texts):
    ids, mask = lm_generate.left_pad([[lm.tok.bos_id] + lm.tok.encode(t) for t in texts],
                                     pad_id=lm.tok.pad_id)
    out, lengths = jax.device_get(lm_generate.generate(
        lm.model, lm.params, ids, mask, jax.random.key(0), max_new_tokens=max_new_tokens,
        stop_tokens=(lm.tok.eos_id,), pad_id=lm.tok.pad_id))
    return [list(out[i, :lengths[i]]) for i in range(len(texts))]
  return complete


@dataclasses.dataclass(frozen=True)
class Codebooks:
  """lm_ids [V] (local index -> LM id), local_emb [V, E], entry_ids [G, 3] (-1 padded LM ids of
  the kept global entries), entry_texts, entry_emb [G, E]; all host numpy, all frozen."""
  lm_ids: np.ndarray
  local_emb: np.ndarray
  entry_ids: np.ndarray
  entry_texts: list
  entry_emb: np.ndarray
  key: str = ""  # `codebook_key` of the inputs they were built from

  def save(self, path):
    fileio.save_npz(path, lm_ids=self.lm_ids, local_emb=self.local_emb,
                    entry_ids=self.entry_ids, entry_emb=self.entry_emb,
                    entry_texts=np.asarray(self.entry_texts), key=np.asarray(self.key))

  @classmethod
  def load(cls, path):
    with np.load(path) as f:
      return cls(f["lm_ids"], f["local_emb"], f["entry_ids"], [str(t) for t in f["entry_texts"]],
                 f["entry_emb"], str(f["key"]) if "key" in f else "")

  def global_ids(self, tokens) -> list:
    """An image's global tokens (entry indices [k]) -> their LM ids, one list per entry."""
    return [[int(i) for i in self.entry_ids[g] if i >= 0] for g in np.asarray(tokens)]


def codebook_key(config, workdir: str) -> str:
  """What the codebooks are made of: the text tokenizer's bytes and the config fields of the
  frozen LM, the CLIP, the data and V2L (`must_match`: not the evaluation's)."""
  cfg = manifest.stage_key(manifest.config_dict(config), must_match(config), {})["config"]
  return fileio.value_digest({"tokenizer": fileio.short_digest(
      data_stage.tokenizer_path(workdir)), "config": cfg})[:16]


def build_codebooks(config, lm: TextLM, clip, clip_params, clip_encode, train_image_emb):
  """The local and the filtered global codebook (module doc, steps 1-2)."""
  c = config.v2l
  lm_ids, texts = codebook.subword_texts(lm.tok)
  local_emb = codebook.embed_texts(clip, clip_params, texts, clip_encode)
  entries = codebook.ngram_candidates(lm_complete(lm), lm_ids, texts, lm.tok.decode)
  entry_emb = codebook.embed_texts(clip, clip_params, [e.text for e in entries], clip_encode)
  keep = codebook.filter_global(entry_emb, train_image_emb, top_k=int(c.global_filter_k),
                                min_images=int(c.global_min_images))
  if len(keep) < int(c.num_global):
    raise ValueError(f"{len(keep)} global entries pass the filter (top-{c.global_filter_k} of "
                     f"> {c.global_min_images} images): fewer than v2l.num_global="
                     f"{c.num_global}; lower v2l.global_min_images")
  kept = [entries[i] for i in keep]
  return Codebooks(lm_ids, local_emb, codebook.entry_id_array(kept), [e.text for e in kept],
                   entry_emb[keep])


def image_global_tokens(books: Codebooks, image_emb, k: int) -> np.ndarray:
  """CLIP image embeddings [N, E] -> int32 [N, k] global entry indices (most similar first)."""
  return np.asarray(codebook.global_tokens(jnp.asarray(image_emb), jnp.asarray(books.entry_emb),
                                           k))


# --- The tokenizer's training --------------------------------------------------------------


def make_model(config, embed_dim: int) -> model_lib.V2LTokenizer:
  c = config.v2l
  return model_lib.V2LTokenizer(model_lib.config_for(
      c.variant, image_size=config.data.resolution, embed_dim=embed_dim, **dict(c.model)))


def loss_cfg(config) -> losses.LossConfig:
  c = config.v2l
  gan = float(c.disc_weight) > 0
  return losses.LossConfig(recon="l1", quant_weight=float(c.quant_weight),
                           perceptual_weight=float(c.perceptual_weight),
                           disc_weight=float(c.disc_weight) if gan else 0.0,
                           disc_start=int(c.disc_start) if gan else 0)


def make_discriminator(config):
  """vq/discriminator.py's PatchGAN (`v2l.disc_variant`), or None when `v2l.disc_weight == 0`."""
  c = config.v2l
  return disc_lib.make_discriminator(c.disc_variant) if float(c.disc_weight) > 0 else None


def gan_loss_fn(params, batch, key, frozen, disc_params, step, *, model, cfg, global_dropout,
                disc):
  """The tokenizer's loss with the GAN term (`disc` None: without); returns (loss, (metrics,
  reconstructions)). frozen = {"local_emb": [V, E], "lpips": LPIPS params or None}; batch =
  {"images" [B, R, R, 3] in [-1, 1], "global_emb" [B, Kg, E]}."""
  x, g = batch["images"], batch["global_emb"]
  keep = jax.random.bernoulli(key, 1.0 - global_dropout, (x.shape[0], 1))  # [B, 1]
  mask = jnp.broadcast_to(keep, g.shape[:2])  # [B, Kg]: all or none of an image's tokens
  (x_rec, aux), inter = model.apply({"params": params}, x, frozen["local_emb"], g, mask,
                                    mutable=["intermediates"])
  gan = {}
  if disc is not None:
    gan = dict(disc_fn=lambda y: disc.apply({"params": disc_params}, y),
               features=losses.decoder_features(inter),
               conv_out_params=params["decoder"]["conv_out"], patch=model.config.patch)
  loss, m = losses.generator_loss(x, x_rec, aux["quant_loss"], step, cfg=cfg,
                                  lpips_params=frozen["lpips"], **gan)
  return loss, (dict(m, usage=aux["usage"], perplexity=aux["perplexity"]), x_rec)


def loss_fn(params, batch, key, frozen, *, model, cfg, global_dropout):
  """`gan_loss_fn` without a discriminator: (loss, metrics)."""
  loss, (m, _) = gan_loss_fn(params, batch, key, frozen, None, 0, model=model, cfg=cfg,
                             global_dropout=global_dropout, disc=None)
  return loss, m


def disc_loss_fn(disc_params, batch, fake, step, *, disc, cfg):
  """The PatchGAN's hinge loss on the batch's images and the reconstructions `fake` (zero
  before `cfg.disc_start`, v2l/losses.py)."""
  real_logits = disc.apply({"params": disc_params}, batch["images"])
  fake_logits = disc.apply({"params": disc_params}, fake)
  d_loss = losses.discriminator_loss(real_logits, fake_logits, step, cfg=cfg)
  return d_loss, {"d_loss": d_loss, "d_logits_real": jnp.mean(real_logits),
                  "d_logits_fake": jnp.mean(fake_logits)}


@dataclasses.dataclass
class Setup:
  """The tokenizer, its trainer and its frozen inputs (on the mesh)."""
  model: model_lib.V2LTokenizer
  trainer: sharded_trainer.Trainer
  frozen: dict
  run_dir: str


def make_trainer(config, embed_dim: int, mesh):
  """The tokenizer and its `sharded_trainer.Trainer` for CLIP embeddings of `embed_dim`."""
  c = config.v2l
  model = make_model(config, embed_dim)
  r, e = config.data.resolution, embed_dim
  init = lambda key: model.init(  # noqa: E731
      key, jnp.zeros((1, r, r, 3)), jnp.zeros((1, e)), jnp.zeros((1, 1, e)),
      jnp.ones((1, 1), bool))["params"]
  adam = lambda lr: sharded_trainer.adamw_cosine(  # noqa: E731
      lr=lr, total_steps=int(c.total_steps), warmup_steps=int(c.warmup_steps),
      final_lr=lr * float(c.final_lr_frac), grad_clip=float(c.grad_clip), b1=0.5, b2=0.9)
  cfg, disc = loss_cfg(config), make_discriminator(config)
  kw = dict(model=model, cfg=cfg, global_dropout=float(c.global_dropout))
  if disc is None:
    return model, sharded_trainer.Trainer(init, functools.partial(loss_fn, **kw),
                                          adam(float(c.lr)), mesh)
  x = jnp.zeros((1, r, r, 3))
  d = sharded_trainer.Discriminator(
      lambda key: disc.init(key, x)["params"],
      functools.partial(disc_loss_fn, disc=disc, cfg=cfg), adam(float(c.disc_lr)))
  return model, sharded_trainer.Trainer(init, functools.partial(gan_loss_fn, disc=disc, **kw),
                                        adam(float(c.lr)), mesh, disc=d)


def setup(config, workdir, local_emb, *, mesh=None) -> Setup:
  check_config(config)
  c = config.v2l
  mesh = mesh or parallel.mesh_from_config(config.mesh, batch_size=config.v2l.batch_size)
  model, trainer = make_trainer(config, local_emb.shape[1], mesh)
  lpips = (perceptual.load_lpips(c.perceptual_weights) if float(c.perceptual_weight) > 0
           else None)
  frozen = jax.device_put({"local_emb": np.asarray(local_emb, np.float32), "lpips": lpips},
                          trainer.repl)
  return Setup(model, trainer, frozen, run_dir(workdir))


class _Examples:
  """`(index, rng) -> {"images", "global_emb"}`."""

  def __init__(self, images, global_emb):
    self.images, self.global_emb = images, global_emb  # [N, R, R, 3] uint8, [N, Kg, E]

  def __call__(self, index, rng):
    del rng
    i = int(index)
    return {"images": clip_train.to_float(self.images[i]), "global_emb": self.global_emb[i]}


def train(config, s: Setup, images, global_emb, *, stop_at_step=None):
  """Trains (or resumes) to `v2l.total_steps`; images uint8 [N, R, R, 3], global_emb [N, Kg,
  E] (each image's global entries' CLIP text embeddings). Returns the state."""
  c = config.v2l
  it = pipeline.sharded_iterator(
      functools.partial(pipeline.dataset, np.arange(len(images)), _Examples(images, global_emb),
                        seed=config.seed),
      batch_size=int(c.batch_size), data_shards=int(c.get("data_shards", 0)), section="v2l")
  key_init, key_train = parallel.replicate(tuple(jax.random.split(jax.random.fold_in(
      jax.random.key(config.seed), 14))), s.trainer.mesh)
  state = loop.run(
      s.run_dir, s.trainer.abstract_state, lambda: s.trainer.init(key_init),
      lambda st, b: s.trainer.step(st, b, key_train, s.frozen), it, config=config,
      must_match=must_match(config), total_steps=int(c.total_steps), log_every=int(c.log_every),
      ckpt_every=int(c.ckpt_every), name="v2l", progress=bool(c.progress),
      stop_at_step=stop_at_step, items_per_step={"perf/images_per_s": int(c.batch_size)})
  return state


def restore_state(s: Setup):
  """The trained tokenizer's state from `s.run_dir/ckpt` (ValueError when absent)."""
  return checkpoint.restore_latest(os.path.join(s.run_dir, "ckpt"), s.trainer.abstract_state,
                                   what="V2L", hint="run python -m vlbpe_jax.v2l.train first")


# Module-level jits with the model static: one compilation per model and shape, however often
# encode_ids / decode_ids are called (restoration calls them for every task; a fresh
# `jax.jit(lambda ...)` per call compiled each time: 24 compilations, ~13 s of the demo's v2l).
@functools.partial(jax.jit, static_argnames=("model",))
def _encode_idx(model, params, local_emb, images):
  return model.apply({"params": params}, images, local_emb, method="encode")[1]


@functools.partial(jax.jit, static_argnames=("model", "use_global"))
def _decode_uint8(model, params, local_emb, idx, global_emb, use_global):
  x = model.apply({"params": params}, idx, local_emb, global_emb,
                  jnp.full(global_emb.shape[:2], use_global), method="decode_ids")
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def encode_ids(s: Setup, params, images, batch_size: int = 32) -> np.ndarray:
  """uint8 [N, R, R, 3] -> int32 [N, h, w] local codebook indices (not LM ids)."""
  mesh = s.trainer.mesh

  def run(chunk):
    with s.trainer.ctx():
      return jax.device_get(_encode_idx(s.model, params, s.frozen["local_emb"],
                                        parallel.shard_batch(clip_train.to_float(chunk), mesh)))
  return parallel.map_batches(run, np.asarray(images), batch_size, parallel.batch_shards(mesh))


def decode_ids(s: Setup, params, idx, global_emb, use_global: bool, batch_size: int = 32):
  """idx int [N, h, w], global_emb [N, Kg, E] -> uint8 images [N, R, R, 3]; `use_global`
  False masks every global token out."""
  mesh = s.trainer.mesh
  idx, global_emb = np.asarray(idx, np.int32), np.asarray(global_emb, np.float32)

  def run(rows):  # rows: indices into idx (padding rows repeat index 0)
    with s.trainer.ctx():
      x = _decode_uint8(s.model, params, s.frozen["local_emb"],
                        *parallel.shard_batch((idx[rows], global_emb[rows]), mesh),
                        use_global=bool(use_global))
      return np.asarray(jax.device_get(x))
  return parallel.map_batches(run, np.arange(len(idx)), batch_size,
                              parallel.batch_shards(mesh))


# --- End to end from the workdir ------------------------------------------------------------


@dataclasses.dataclass
class Context:
  """Everything the V2L stage and CLIs share: data, frozen models, codebooks, tokenizer."""
  config: object
  mesh: object
  lm: TextLM
  books: Codebooks
  clip: object
  clip_params: object
  train: dict
  test: dict
  train_tokens: np.ndarray  # [N, num_global] global entry indices
  test_tokens: np.ndarray
  s: Setup

  def global_emb(self, tokens):
    return self.books.entry_emb[tokens]  # [N, Kg, E]


def load_context(config, workdir: str) -> Context:
  """Loads the data and the frozen models, builds (or reads) the codebooks."""
  check_config(config)
  mesh = parallel.mesh_from_config(config.mesh, batch_size=config.v2l.batch_size)
  lm = load_text_lm(config, workdir, mesh)
  clip, clip_params, _ = clip_train.restore(config, workdir, mesh)
  train_data = data_stage.load_scenes(config, workdir, "train")
  test_data = data_stage.load_scenes(config, workdir, "test")
  train_emb = clip_train.image_embeddings(clip, clip_params, train_data["images"], mesh)
  test_emb = clip_train.image_embeddings(clip, clip_params, test_data["images"], mesh)
  path = os.path.join(run_dir(workdir), "codebook.npz")
  key = codebook_key(config, workdir)
  if os.path.exists(path):  # the stage deletes the dir when an input changes; a CLI may not
    books = Codebooks.load(path)
    if books.key != key:
      raise ValueError(f"{path} was built from another tokenizer, LM, CLIP or V2L config (key "
                       f"{books.key or '<none>'}, now {key}): its token ids would not be this "
                       f"LM's. Delete {run_dir(workdir)} (or rerun the pipeline with "
                       "--config.recompute=v2l) to rebuild it")
  else:
    books = dataclasses.replace(build_codebooks(config, lm, clip, clip_params,
                                                clip_train.encode_fn(lm.tok), train_emb),
                                key=key)
    books.save(path)
  k = int(config.v2l.num_global)
  s = setup(config, workdir, books.local_emb, mesh=mesh)
  return Context(config, mesh, lm, books, clip, clip_params, train_data, test_data,
                 image_global_tokens(books, train_emb, k), image_global_tokens(books, test_emb, k),
                 s)


def _test_ids(ctx: Context, params, num, idx):
  """The first `num` test images and their local indices (`idx`, when given: encode_ids of
  exactly those images, computed once by the caller)."""
  images = ctx.test["images"][:num]
  if idx is None:
    return images, encode_ids(ctx.s, params, images)
  idx = np.asarray(idx)
  if idx.shape[0] != len(images):
    raise ValueError(f"idx holds {idx.shape[0]} token maps for {len(images)} test images: "
                     "expected encode_ids of exactly those images")
  return images, idx


def reconstruction_psnr(ctx: Context, params, num: int | None = None, idx=None) -> dict:
  """Test-split PSNR (dB) of decode(encode(x)) with and without the global tokens (`idx`: the
  images' local indices, if already encoded)."""
  images, idx = _test_ids(ctx, params, num, idx)
  g = ctx.global_emb(ctx.test_tokens[:len(images)])
  return {"local": vq_metrics.psnr_db(images, decode_ids(ctx.s, params, idx, g, False)),
          "local_global": vq_metrics.psnr_db(images, decode_ids(ctx.s, params, idx, g, True))}


def code_stats(ctx: Context, params, num: int | None = None, idx=None) -> dict:
  """The local codebook's use on the test split: {"usage": share of the V local tokens that
  occur, "perplexity": exp(entropy) of their frequencies}. A collapsed codebook (a few tokens
  for every image) shows here before it shows anywhere else. `idx` as `reconstruction_psnr`."""
  _, idx = _test_ids(ctx, params, num, idx)
  v = len(ctx.books.lm_ids)
  return {"usage": float(vq_metrics.codebook_usage(idx, v)),
          "perplexity": float(vq_metrics.code_perplexity(idx, v))}


def train_and_evaluate(config, workdir: str, *, stop_at_step=None):
  """Returns (context, state, result dict)."""
  ctx = load_context(config, workdir)
  state = train(config, ctx.s, ctx.train["images"], ctx.global_emb(ctx.train_tokens),
                stop_at_step=stop_at_step)
  idx = encode_ids(ctx.s, state["params"], ctx.test["images"])  # the test split, once
  out = {"recon_psnr_db": reconstruction_psnr(ctx, state["params"], idx=idx),
         "codes": code_stats(ctx, state["params"], idx=idx),
         "num_local": int(len(ctx.books.lm_ids)), "num_global_entries":
         int(len(ctx.books.entry_ids)),
         "train_seconds": loop.train_seconds(os.path.join(ctx.s.run_dir, "ckpt"))}
  return ctx, state, out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  jax.config.update("jax_threefry_partitionable", True)
  train_text_lm(flags.FLAGS.config, flags.FLAGS.workdir)  # its frozen LM first, when it has phases
  _, _, out = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  print(fileio.dumps_json(out))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/tiny.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Pipeline directory (V2L writes under workdir/v2l).")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
