"""Trains the unified LM: text pretraining (stage 0), then Being-VL's stages 1-3 with a curriculum.

  python -m vlbpe_jax.lm.train --config=configs/tiny.py --workdir=$W

Needs the `data`, `vq` and `bpe` stages' files in `$W` (tfds shapes, text tokenizer, code grids,
visual BPE). Stage 0 trains a text-only model on the dataset's texts (the stand-in for the
pretrained LLM a real user loads) into `$W/text/`; the vocabulary is then extended with VQ +
BPE rows and a run follows a *plan* of phases `(stage, steps, tasks, lr)`:

  full                   stage 1 (new rows) -> 2 (+ first layers) -> 3 (all), data per config
                         curriculum
  no_bpe                 the same plan on raw VQ codes
  single_stage           one stage-3 phase of the same total steps on every phase's data mixed
  staged_no_curriculum   full's stages, steps and LRs, each on every phase's data mixed
  curriculum_no_staging  full's phases and data, all weights throughout at single_stage_lr: one
                         optimizer state and one LR schedule over all phases (`Phase.optimizer`),
                         as if one stage; only the data mix changes at a phase boundary

Each run lives in `$W/lm/<run>/`: orbax checkpoints (state + grain iterator + config) in
`ckpt/`, `metrics.jsonl` (+ the same scalars as a TensorBoard event file). Reads `config.lm.*`
(see `check_config`), `config.seed` (through `lm_seed`: `lm.seed` when set, so that LM seeds
vary on one set of data/VQ/BPE files), `config.mesh` and, through the data stage,
`config.data.*`.
"""

import contextlib
import dataclasses
import functools
import json
import os

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from vlbpe_jax import checkpoint
from vlbpe_jax import cli
from vlbpe_jax import loop
from vlbpe_jax import manifest
from vlbpe_jax import parallel
from vlbpe_jax import sharded_trainer
from vlbpe_jax import summary
from vlbpe_jax.data import pipeline
from vlbpe_jax.lm import model as lm_model
from vlbpe_jax.lm import sequences
from vlbpe_jax.lm import stages

RUNS = ("full", "no_bpe", "single_stage", "staged_no_curriculum", "curriculum_no_staging")
# Config keys a checkpoint must agree on before it is restored: stage 0's, then the runs'.
# lm.seed is keyed as `manifest.config_dict` shows it: absent while it means `seed`.
TEXT_MUST_MATCH = ("seed", "lm.seed", "lm.variant", "lm.model", "lm.seq_len", "lm.batch_size",
                   "lm.text_steps", "lm.text_tasks", "lm.vocab_multiple")
# V2L's frozen LM (`pretrain_icl`): stage 0, then `lm.text_phases`.
ICL_MUST_MATCH = TEXT_MUST_MATCH + ("lm.text_lr", "lm.text_phases", "lm.denoise_palettes",
                                    "lm.denoise_ns", "lm.denoise_shots")
# The "denoise" episodes' settings in config (`lm.denoise_<key>`), keys of icl.denoise_task.
DENOISE_FIELDS = ("ns", "shots", "palettes")
MUST_MATCH = TEXT_MUST_MATCH + ("lm.stage_steps", "lm.stage_tasks", "lm.first_frac",
                                 "lm.positions", "lm.vqa_questions", "lm.vqa_branches")
# lm.positions: "1d" RoPE everywhere, or "2d" (visual tokens at their (row, col) on the code
# grid, text on the diagonal, which equals 1D RoPE; pipeline.grid_positions).
POSITIONS = ("1d", "2d")


@dataclasses.dataclass(frozen=True)
class Phase:
  """`steps` steps of optimizer stage `stage` (1-3) on `tasks` at peak learning rate `lr`.

  The LR schedule (warm-up + cosine) spans `schedule_steps` steps (0: the phase's own). Phases
  in a row with the same `optimizer` share one optimizer state, step count included, so the
  schedule runs on across them (curriculum_no_staging); at any other phase boundary Adam's
  state migrates (`stages.migrate_opt_state`) and the schedule restarts.
  """
  stage: int
  steps: int
  tasks: tuple
  lr: float
  schedule_steps: int = 0
  seq_len: int = 0  # its rows' length in tokens (0: lm.seq_len)

  @property
  def optimizer(self) -> tuple:
    """What the phase's optimizer is made of: (stage, peak LR, schedule length)."""
    return (self.stage, self.lr, self.schedule_steps or self.steps)


def plan_of(config, run: str) -> list[Phase]:
  """The phases of a run (`"text"` is stage 0: every task, text only, all weights)."""
  c = config.lm
  if run == "text":
    return [Phase(3, int(c.text_steps), text_tasks(config), float(c.text_lr))]
  if run == "text_icl":
    phases = [Phase(3, int(p[0]), tuple(p[1]), float(p[2]),
                    seq_len=int(p[3]) if len(p) > 3 else 0) for p in text_phases(config)]
    if not phases:
      raise ValueError("run='text_icl': lm.text_phases is empty")
    return phases
  phases = [Phase(s, int(n), tuple(t), float(lr)) for s, n, t, lr in
            zip(stages.STAGES, c.stage_steps, c.stage_tasks, c.stage_lrs)]
  mixed = sum((p.tasks for p in phases), ())  # every phase's tasks, in the curriculum's weights
  total = sum(p.steps for p in phases)
  if run in ("full", "no_bpe"):
    return phases
  if run == "single_stage":
    return [Phase(3, total, mixed, float(c.single_stage_lr))]
  if run == "staged_no_curriculum":
    return [dataclasses.replace(p, tasks=mixed) for p in phases]
  if run == "curriculum_no_staging":  # one optimizer: single_stage's, fed the curriculum
    return [Phase(3, p.steps, p.tasks, float(c.single_stage_lr), total) for p in phases]
  raise ValueError(f"run={run!r}: expected 'text' or one of {RUNS}")


def text_tasks(config) -> tuple:
  """Stage 0's task mix: `lm.text_tasks`; when absent, every task of pipeline.TASKS but "look"
  and "induction" (subsets of "vqa" and "icl", which would only weight those up) and
  "span_induction" / "suffix_induction" / "match_classify" (for `lm.text_phases`)."""
  return tuple(config.lm.get("text_tasks", tuple(
      t for t in pipeline.TASKS if t not in (
          "look", "induction", "span_induction", "suffix_induction", "match_classify"))))


def text_phases(config) -> tuple:
  """`lm.text_phases`: `((steps, tasks, peak_lr[, row_len]), ...)` (row_len: the phase's rows in
  tokens, default lm.seq_len; the episodes are 20-40 tokens, and shorter rows give more updates
  for the same tokens: BENCHMARKS.md, "Shorter rows"), phases that continue stage 0's text
  model into V2L's frozen LM (`pretrain_icl`, `$W/text_icl`), each with its own warm-up +
  cosine (Adam's moments carried over, as between stages); () when absent (V2L reads stage 0
  itself). The demo's: in-context denoising episodes in the restoration prompt's layout
  (`data/icl.py`; BENCHMARKS.md, "V2L tokenizer"). Being-VL's runs and the blind baseline
  start from stage 0, not from this continuation (from it, on the demo, the blind baseline fell
  from 23% to 0% VQA and the full run's caption recall from 0.27 to 0.11)."""
  return tuple(config.lm.get("text_phases", ()))


def denoise_settings(config) -> dict:
  """The "denoise" episodes' `data/icl.denoise_task` settings that `config.lm` sets, as a dict
  over `icl.TRAIN_DENOISE` (absent fields: its values): `lm.denoise_ns` (window lengths n, one
  drawn per episode), `lm.denoise_shots` (numbers of examples, 1-10) and `lm.denoise_palettes`
  (per episode one size k, the clean windows drawn from k local ids, 0 = all of them)."""
  return {k: tuple(config.lm[f"denoise_{k}"]) for k in DENOISE_FIELDS
          if config.lm.get(f"denoise_{k}", None) is not None}


def vqa_questions(config) -> int:
  """`lm.vqa_questions`: VQA questions kept per image in a training example of stages 1-3 (0,
  the default when absent: all of them; pipeline.format_example). Stage 0, the text-only
  stand-in for a pretrained LLM, keeps every question."""
  return int(config.lm.get("vqa_questions", 0))


def vqa_branches(config) -> bool:
  """`lm.vqa_branches`: an image's VQA questions as branches after it, each seeing the image
  and itself only (pipeline.format_example; False, the default when absent: one line)."""
  return bool(config.lm.get("vqa_branches", False))


def lm_seed(config) -> int:
  """The LM stage's seed (init, data order, dropout): `lm.seed`, or `seed` when it is -1."""
  s = int(config.lm.get("seed", -1))
  return int(config.seed) if s == -1 else s


def check_config(config):
  """Raises ValueError on bad `config.lm` values (before any compilation)."""
  c = config.lm
  pipeline.check_denoise({k: c[f"denoise_{k}"] for k in DENOISE_FIELDS
                          if c.get(f"denoise_{k}", None) is not None}, prefix="lm.denoise_")
  q = c.get("vqa_questions", 0)
  if isinstance(q, bool) or not isinstance(q, int) or q < 0:
    raise ValueError(f"lm.vqa_questions={q!r}: expected an int >= 0 (0: every question of an "
                     "image in one example)")
  b = c.get("vqa_branches", False)
  if not isinstance(b, bool):
    raise ValueError(f"lm.vqa_branches={b!r}: expected True or False")
  if b and c.model.get("attention_impl", None) == "splash":
    raise ValueError("lm.vqa_branches=True with lm.model.attention_impl='splash': expected "
                     "'blockwise' or an implementation that takes a mask (the splash kernel "
                     "has no branch mask)")
  for name in ("seq_len", "batch_size", "log_every", "ckpt_every", "text_steps",
               "vocab_multiple"):
    if int(c[name]) < 1:
      raise ValueError(f"lm.{name}={c[name]!r}: expected a positive int")
  n = len(stages.STAGES)
  for name in ("stage_steps", "stage_tasks", "stage_lrs"):
    if len(c[name]) != n:
      raise ValueError(f"lm.{name}={c[name]!r}: expected {n} entries, one per stage")
  if any(int(s) < 1 for s in c.stage_steps):
    raise ValueError(f"lm.stage_steps={c.stage_steps!r}: expected positive ints")
  for tasks in c.stage_tasks:
    bad = [t for t in tasks if t not in pipeline.TASKS or t in pipeline.TEXT_ONLY_TASKS]
    if not tasks or bad:
      raise ValueError(f"lm.stage_tasks entry {tasks!r}: expected a non-empty tuple of "
                       f"{tuple(t for t in pipeline.TASKS if t not in pipeline.TEXT_ONLY_TASKS)}"
                       f" (the text-only {pipeline.TEXT_ONLY_TASKS} are for lm.text_tasks)")
  tasks = text_tasks(config)
  if not tasks or any(t not in pipeline.TASKS for t in tasks):
    raise ValueError(f"lm.text_tasks={tasks!r}: expected a non-empty tuple of {pipeline.TASKS}")
  for phase in text_phases(config):
    ok = isinstance(phase, (tuple, list)) and len(phase) in (3, 4)
    if ok:
      n, t, lr, *row = phase
      ok = (isinstance(n, int) and n >= 1 and isinstance(t, (tuple, list)) and t
            and all(x in pipeline.TASKS for x in t) and float(lr) > 0
            and all(isinstance(r, int) and r >= 2 for r in row))
    if not ok:
      raise ValueError(f"lm.text_phases entry {phase!r}: expected (steps >= 1, a non-empty "
                       f"tuple of {pipeline.TASKS}, peak lr > 0[, row length >= 2 tokens])")
  stages.num_first_layers(1, c.first_frac)  # validates the fraction
  if int(c.get("seed", -1)) < -1:
    raise ValueError(f"lm.seed={c.seed!r}: expected -1 (use config.seed) or a seed >= 0")
  if c.get("positions", "1d") not in POSITIONS:
    raise ValueError(f"lm.positions={c.positions!r}: expected one of {POSITIONS}")


def grid_positions(config) -> bool:
  """Whether visual tokens get 2D RoPE positions (`lm.positions == "2d"`)."""
  return config.lm.get("positions", "1d") == "2d"


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def text_rows(config, tokenizer) -> int:
  """Rows of the text tables: the tokenizer's vocabulary padded to `lm.vocab_multiple` (so
  that the `vocab` axis splits over the mesh); padded ids are never inputs. VQ code c of the
  extended model has id `text_rows + c`."""
  return _round_up(tokenizer.vocab_size, int(config.lm.vocab_multiple))


def make_model(config, tokenizer, num_vq: int = 0, num_bpe: int = 0) -> lm_model.LM:
  """The decoder; the visual table (VQ + BPE rows) is padded to `lm.vocab_multiple` too. With
  visual rows, `<img>` `</img>` (never in stage 0's text) get new rows that stage 1 trains."""
  visual = num_vq + num_bpe
  pad = _round_up(visual, int(config.lm.vocab_multiple)) - visual if visual else 0
  new_ids = (tokenizer.image_begin_id, tokenizer.image_end_id) if visual else ()
  return lm_model.LM(lm_model.lm_config(
      config.lm.variant, text_vocab=text_rows(config, tokenizer), num_vq=num_vq,
      num_bpe=num_bpe + pad, new_text_ids=new_ids, **dict(config.lm.model)))


def lr_schedule(config, phase: Phase):
  """The LR at step n of the phase's optimizer: warm-up + cosine decay over its schedule."""
  c = config.lm
  _, lr, steps = phase.optimizer
  warmup = min(int(c.warmup_steps), max(steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                            lr * c.final_lr_frac)


def make_tx(config, phase: Phase, params):
  """The phase's optimizer: AdamW with `lr_schedule` on its step count (which
  `stages.migrate_opt_state` restarts at 0 for a new optimizer, keeping Adam's moments)."""
  c = config.lm
  schedule = lr_schedule(config, phase)
  return stages.make_optimizer(phase.stage, params, schedule, clip=c.grad_clip,
                               weight_decay=c.weight_decay, first_frac=c.first_frac,
                               b1=c.b1, b2=c.b2)


def loss_fn(params, batch, key, *, model):
  """Next-token cross-entropy on the loss-masked targets.

  batch: inputs/targets/segment_ids/positions `[B, T]` int32, loss_mask `[B, T]` bool, and
  optionally branch_ids `[B, T]` (`lm.vqa_branches`). Returns `(loss, metrics)`.
  """
  logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"], branch_ids=batch.get("branch_ids"),
                       rngs={"dropout": key})  # [B, T, V]
  if logits.shape[:2] != batch["targets"].shape:
    raise ValueError(f"Incorrect shapes. Got {logits.shape} logits and "
                     f"{batch['targets'].shape} targets")
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, T]
  w = batch["loss_mask"].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  loss = jnp.sum(ce * w) / n
  acc = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * w) / n
  return loss, {"loss": loss, "token_acc": acc, "loss_tokens": jnp.sum(w)}


def train_step(state, batch, key, *, model, tx):
  """One update of `state = {"step", "params", "opt"}`; returns `(state, metrics)`."""
  key = jax.random.fold_in(key, state["step"])
  metrics, params, opt, norms = sharded_trainer.descend(
      functools.partial(loss_fn, model=model), tx, state["params"], state["opt"], batch, key)
  return {"step": state["step"] + 1, "params": params, "opt": opt}, {**metrics, **norms}


class Trainer:
  """Sharded state layout, init, jitted step and optimizer migration of one model on one mesh.

  The state is born sharded: `eval_shape(init)` -> logical names -> `NamedSharding`s ->
  `jit(..., out_shardings=...)`. Optimizers, shardings and jitted functions are built once per
  `Phase.optimizer`: phases that share an optimizer share its compiled step.
  """

  def __init__(self, config, model, mesh):
    self.config, self.model, self.mesh = config, model, mesh
    self.rules = parallel.LOGICAL_AXIS_RULES
    # One row per batch shard and 128 tokens: the splash kernel runs under shard_map (the batch
    # split over the mesh) on 128-token blocks. Shapes only: the params do not depend on them.
    ids = jnp.zeros((parallel.batch_shards(mesh), 128), jnp.int32)
    self._init_params = lambda key: model.init(key, ids)["params"]
    with self.ctx():
      boxed = jax.eval_shape(self._init_params, jax.random.key(0))
      self.param_shardings = parallel.logical_shardings(boxed, mesh, self.rules)
    self.abstract_params = nn.unbox(boxed)
    self.repl = parallel.replicated(mesh)
    self._fns, self._txs, self._shardings = {}, {}, {}

  @contextlib.contextmanager
  def ctx(self):
    with parallel.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def tx(self, phase: Phase):
    if phase.optimizer not in self._txs:
      self._txs[phase.optimizer] = make_tx(self.config, phase, self.abstract_params)
    return self._txs[phase.optimizer]

  def state_shardings(self, phase: Phase):
    if phase.optimizer not in self._shardings:
      abstract_opt = jax.eval_shape(self.tx(phase).init, self.abstract_params)
      self._shardings[phase.optimizer] = {
          "step": self.repl, "params": self.param_shardings,
          "opt": parallel.opt_shardings(abstract_opt, self.abstract_params, self.param_shardings,
                               self.mesh)}
    return self._shardings[phase.optimizer]

  def abstract_state(self, phase: Phase):
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": self.abstract_params,
                "opt": jax.eval_shape(self.tx(phase).init, self.abstract_params)}
    return checkpoint.abstract_like(abstract, self.state_shardings(phase))

  def _jit(self, key, make):
    """A jitted function built once per key (optimizers are hashable); `key[0]` names it."""
    if key not in self._fns:
      self._fns[key] = parallel.Together(make(), f"lm {key[0]}")
    return self._fns[key]

  def init(self, key, phase: Phase, base_params=None):
    """Fresh state; `base_params` (e.g. stage 0's text model) overwrite the leaves they hold."""
    tx = self.tx(phase)

    def init(key, base):
      params = nn.unbox(self._init_params(key))
      params = {**params, **(base or {})}
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params)}

    fn = self._jit(("init", phase.optimizer), lambda: jax.jit(
        init, out_shardings=self.state_shardings(phase)))
    with self.ctx():
      return fn(key, base_params)

  def migrate(self, state, old: Phase, new: Phase):
    """Moves `state["opt"]` from `old`'s optimizer to `new`'s (`stages.migrate_opt_state`:
    Adam moments and counts of leaves trained before kept, newly trainable ones fresh)."""
    tx = self.tx(new)
    fn = self._jit(("migrate", old.optimizer, new.optimizer), lambda: jax.jit(
        lambda opt, params: stages.migrate_opt_state(
            opt, old.stage, new.stage, params, tx, first_frac=self.config.lm.first_frac),
        out_shardings=self.state_shardings(new)["opt"], donate_argnums=(0,)))
    with self.ctx():
      return {**state, "opt": fn(state["opt"], state["params"])}

  def step_fn(self, phase: Phase):
    """The phase's jitted `train_step(state, batch, key)` on global arrays (vlbpe_jax/aot.py
    lowers it on `ShapeDtypeStruct`s)."""
    sh = self.state_shardings(phase)
    return self._jit(("step", phase.optimizer), lambda: jax.jit(
        functools.partial(train_step, model=self.model, tx=self.tx(phase)),
        in_shardings=(sh, parallel.batch_sharding(self.mesh, 2), self.repl),
        out_shardings=(sh, self.repl), donate_argnums=(0,)))

  def step(self, phase: Phase, state, batch, key):
    fn = self.step_fn(phase)
    with self.ctx():
      return fn(state, parallel.shard_batch(batch, self.mesh), key)


def _phase_at(plan, step):
  """Index of the phase that runs global step `step` (0-based); len(plan) past the end."""
  ends = np.cumsum([p.steps for p in plan])
  return int(np.searchsorted(ends, step, side="right"))


def run_plan(config, run_dir: str, trainer: Trainer, plan, make_iter, *, base_params=None,
             stop_at_step=None, name="lm", must_match=MUST_MATCH, init_state=None):
  """Trains `plan` with `loop.fit` (resuming from `run_dir/ckpt`); returns the final state.

  make_iter(phase) -> a fresh grain iterator of that phase's batches. The checkpoint at a
  phase's last step holds that phase's optimizer state and iterator; the next phase migrates
  from it (in memory or after a restore alike), or keeps it whole when it has the same
  `Phase.optimizer`. `stop_at_step` stops early (after a checkpoint) at that global step, as a
  preemption would. A non-finite loss (or parameter norm after the update) raises
  FloatingPointError naming the step and its stage; the last checkpoint stays a good one.
  Metrics lines (`train/...`, `stage`, `perf/...`) go to `run_dir/metrics.jsonl`.
  `init_state()`: the state to start from when `run_dir` holds no checkpoint (default: fresh,
  with `base_params`); a state at step s > 0 starts in the phase that holds step s + 1.
  """
  c = config.lm
  ends = np.cumsum([p.steps for p in plan]).tolist()
  key_init, key_train = (parallel.replicate(k, trainer.mesh)
                         for k in jax.random.split(jax.random.key(lm_seed(config))))
  with checkpoint.Checkpointer(os.path.join(run_dir, "ckpt"),
                               config=manifest.config_dict(config), must_match=must_match,
                               max_to_keep=2) as ckpt:
    latest = ckpt.latest_step()
    k = 0 if latest is None else min(_phase_at(plan, latest - 1), len(plan) - 1)
    it = make_iter(plan[k])
    state, start, seconds = loop.restore_or_init(
        ckpt, trainer.abstract_state(plan[k]),
        init_state or (lambda: trainer.init(key_init, plan[0], base_params)), it)

    def before_step(step, state, it):
      """At a phase boundary: the next data mix; a new optimizer migrates."""
      nonlocal k
      if step != ends[k]:
        return state, it
      if plan[k + 1].optimizer != plan[k].optimizer:
        state = trainer.migrate(state, plan[k], plan[k + 1])
      k += 1
      logging.info("%s: step %d, stage %d on %s", name, step, plan[k].stage, plan[k].tasks)
      return state, make_iter(plan[k])

    def tokens_per_device(step):  # the logged step's phase's rows
      phase = plan[min(_phase_at(plan, step - 1), len(plan) - 1)]
      return c.batch_size * (phase.seq_len or c.seq_len) / jax.device_count()

    with summary.MetricWriter(run_dir, resume_step=start) as writer:
      return loop.fit(
          state, lambda state, batch: trainer.step(plan[k], state, batch, key_train), it,
          total_steps=ends[-1], ckpt=ckpt, writer=writer, log_every=c.log_every,
          ckpt_every=c.ckpt_every, name=name, seconds_before=seconds,
          items_per_step={"perf/tokens_per_s_per_device": tokens_per_device},
          check_keys=("loss", "l2_params"), progress=c.progress, stop_at_step=stop_at_step,
          ckpt_at=ends, before_step=before_step,
          extra_scalars=lambda step: {"stage": plan[_phase_at(plan, step - 1)].stage})


def iterator_fn(config, tok, source, visual):
  """`phase -> iterator` of packed batches of the phase's tasks (`visual=None`: text only):
  this process's rows of the global batch `lm.batch_size`, from its `lm.data_shards` shards
  (`pipeline.sharded_iterator`; 0: one shard per process; a fixed count gives the same global
  batches for any process count dividing it)."""

  def make_iter(phase):
    return pipeline.sharded_iterator(
        functools.partial(sequences.train_dataset, source, tok, phase.tasks, visual,
                          seq_len=phase.seq_len or config.lm.seq_len, seed=lm_seed(config),
                          worker_count=config.lm.worker_count, grid=grid_positions(config),
                          questions=vqa_questions(config) if visual is not None else 0,
                          branches=vqa_branches(config) and visual is not None,
                          denoise=denoise_settings(config)),
        batch_size=int(config.lm.batch_size), data_shards=int(config.lm.get("data_shards", 0)),
        section="lm")
  return make_iter


def text_dir(workdir) -> str:
  """Stage 0's run (the pipeline's `text` stage): `$W/text`."""
  return os.path.join(workdir, "text")


def icl_dir(workdir) -> str:
  """V2L's frozen LM, stage 0 continued on `lm.text_phases` (the pipeline's `text_icl` stage):
  `$W/text_icl`."""
  return os.path.join(workdir, "text_icl")


def pretrain_text(config, workdir, tok, source, mesh, *, stop_at_step=None):
  """Stage 0: the text-only model on every task's text, in `text_dir` (resumed, or restored
  when finished). Returns its (sharded) params."""
  plan = plan_of(config, "text")
  trainer = Trainer(config, make_model(config, tok), mesh)
  make_iter = iterator_fn(config, tok, source, None)
  state = run_plan(config, text_dir(workdir), trainer, plan, make_iter,
                   stop_at_step=stop_at_step, name="text", must_match=TEXT_MUST_MATCH)
  return state["params"]


def pretrain_icl(config, workdir, tok, source, mesh, *, stop_at_step=None):
  """V2L's frozen LM: stage 0 continued on `lm.text_phases` in a run of its own, `icl_dir`
  (resumable like every run); returns its (sharded) params.

  The run's plan is stage 0's phase, then the text phases; it starts from stage 0's finished
  state (`text_dir`'s ckpt: params and Adam state, at its last step), so it continues as one
  stage-0 run through all the phases would (Adam's moments migrate at each phase boundary),
  while stage 0, which Being-VL's runs start from, stays as it is. (Stage 0's params with
  a fresh optimizer instead gave an LM that restores nothing on the demo: BENCHMARKS.md,
  "Teaching the frozen LM to restore".)
  """
  text_plan = plan_of(config, "text")
  plan = text_plan + plan_of(config, "text_icl")
  trainer = Trainer(config, make_model(config, tok), mesh)

  def stage0_state():
    state = checkpoint.restore_latest(
        os.path.join(text_dir(workdir), "ckpt"), trainer.abstract_state(text_plan[0]),
        what="stage-0 text LM", hint="run pretrain_text first",
        config=manifest.config_dict(config), must_match=TEXT_MUST_MATCH)
    if int(jax.device_get(state["step"])) != text_plan[0].steps:
      raise ValueError(f"stage 0's checkpoint is at step {int(state['step'])}: expected its "
                       f"last, {text_plan[0].steps} (run pretrain_text to the end first)")
    return state

  state = run_plan(config, icl_dir(workdir), trainer, plan,
                   iterator_fn(config, tok, source, None), init_state=stage0_state,
                   stop_at_step=stop_at_step, name="text_icl", must_match=ICL_MUST_MATCH)
  return state["params"]


def train_run(config, workdir, run, tok, source, visual, num_vq, num_bpe, text_params, mesh,
              *, stop_at_step=None):
  """Stages 1-3 (or the single-stage ablation) of `run`. Returns `(model, trainer, state)`."""
  plan = plan_of(config, run)
  model = make_model(config, tok, num_vq, num_bpe)
  trainer = Trainer(config, model, mesh)
  make_iter = iterator_fn(config, tok, source, visual)
  state = run_plan(config, os.path.join(workdir, "lm", run), trainer, plan, make_iter,
                   base_params=text_params, stop_at_step=stop_at_step, name=f"lm/{run}")
  return model, trainer, state


def trainable_counts(config, run_plan_, params) -> list[int]:
  """Trainable parameters of each phase of a plan."""
  return [int(stages.trainable_count(params, p.stage, config.lm.first_frac)) for p in run_plan_]


def make_mesh(config):
  """The LM's mesh: fitted to `lm.batch_size` (vlbpe_jax/parallel.py:plan_mesh)."""
  return parallel.mesh_from_config(config.mesh, batch_size=config.lm.batch_size)


def train_and_evaluate(config, workdir: str, run: str = "full") -> dict:
  """Stage 0, then `run` on the pipeline's files in `workdir`; evaluates on the test split."""
  from vlbpe_jax.data import stage as data_stage  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.lm import evaluate  # pylint: disable=g-import-not-at-top
  check_config(config)
  mesh = make_mesh(config)
  tok = data_stage.load_tokenizer(workdir)
  train_src = data_stage.data_source(config, workdir, "train")
  visual, num_vq, num_bpe = sequences.load_visual_tokens(
      workdir, "vq" if run == "no_bpe" else "bpe", vq_start=text_rows(config, tok))
  text_params = pretrain_text(config, workdir, tok, train_src, mesh)
  model, trainer, state = train_run(config, workdir, run, tok, train_src, visual["train"],
                                    num_vq, num_bpe, text_params, mesh)
  test = data_stage.data_source(config, workdir, "test")
  examples = evaluate.first_examples(test, config.lm.num_eval)
  with trainer.ctx():
    res = evaluate.evaluate(model, state["params"], tok, examples, visual["test"],
                            batch_size=config.lm.eval_batch_size,
                            max_answer_tokens=config.lm.max_answer_tokens,
                            max_caption_tokens=config.lm.max_caption_tokens,
                            grid=grid_positions(config))
  return {k: v for k, v in res.items() if not isinstance(v, list)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  jax.config.update("jax_threefry_partitionable", True)
  print(json.dumps(train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir,
                                      flags.FLAGS.run)))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/tiny.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Pipeline directory (the LM writes under workdir/lm).")
  flags.DEFINE_enum("run", "full", RUNS, "Which plan to train.")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
