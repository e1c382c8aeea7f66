"""The pipeline: data -> text LM (stage 0) + VQ -> visual BPE -> unified LM -> CLIP + pixel
decoder + DiT; V2L's frozen LM -> V2L, each stage reading its inputs' files.

Every stage is `run_stage(config, workdir) -> metrics` in its own package (`vlbpe_jax/<x>/
stage.py`) and adds its section to the one report (`workdir/report/index.html`,
`metrics.json`). `config.stages` picks which run.

Resume rule (`vlbpe_jax/manifest.py`): each stage's outputs carry a manifest of the config
fields that produced them (its own and those of the stages it reads) and the digests of the
files it read. A rerun skips a stage whose manifest matches, resumes one that was interrupted,
and recomputes one whose inputs changed, with everything downstream. A stage that holds a
training run (`Stage.trains`) is never deleted silently: it is refused with the changed fields,
unless `config.recompute` names it or a stage before it (`all`: every stage). A change of the
fields only its evaluation reads (`Stage.eval_fields`, e.g. V2L's few-shot episodes) keeps
the trained run and evaluates it again.

Several processes (`parallel.initialize_distributed`): every process decides a stage's status
from the same files, then process 0 alone writes manifests and reports. A stage that runs on
the mesh (`Stage.collective`: the trainers; BPE, whose learner sums its counts over processes)
runs on every process; the data stage (host work writing files) runs on process 0 while the rest
wait at a barrier and then read its files.

Stages that do not read each other's outputs may run at the same time, on threads of this
process (`config.stage_workers`, the demo's 2): a stage starts once every stage it reads that
was selected has finished, so the demo runs `text`, `clip`, `pixel_decoder`, `text_icl` and
`v2l` (which read the text LM, not Being-VL's runs) beside `vq` -> `bpe` -> `lm`, then `dit`.
Each stage computes what it would alone (explicit PRNG keys, no shared mutable state; the
report and TFDS preparation take a lock): only its seconds change. A multi-process run, or
one on several GPUs or TPUs, keeps one stage at a time (collectives of two programs must not
meet the devices in different orders; `parallel.stage_workers`).
"""

from concurrent import futures
import contextlib
import copy
import dataclasses
import html
import os
import shutil
import signal
import threading
import time
from typing import Callable

from absl import logging

from vlbpe_jax import fileio
from vlbpe_jax import manifest
from vlbpe_jax import parallel
from vlbpe_jax.bpe import stage as bpe_stage
from vlbpe_jax.clip import stage as clip_stage
from vlbpe_jax.data import stage as data_stage
from vlbpe_jax.dit import stage as dit_stage
from vlbpe_jax.eval import longer_run
from vlbpe_jax.eval import seed_claims
from vlbpe_jax.eval import report
from vlbpe_jax.lm import stage as lm_stage
from vlbpe_jax.v2l import stage as v2l_stage
from vlbpe_jax.v2l import train as v2l_train
from vlbpe_jax.vq import stage as vq_stage


@dataclasses.dataclass(frozen=True)
class Stage:
  """How the pipeline keys, skips and recomputes one stage."""
  run: Callable  # run_stage(config, workdir) -> metrics; adds the report section `name`
  config_keys: tuple  # config fields it reads itself (dotted paths)
  reads: tuple = ()  # upstream stages whose outputs it reads
  outputs: tuple = ()  # globs (relative to workdir) of the files later stages read
  owns: tuple = ()  # what it writes (relative to workdir), deleted before a recompute
  trains: bool = False  # holds a training run: a recompute must be asked for
  collective: bool = False  # runs on every process (jax on the global mesh), not process 0 alone
  # Config fields (dotted) that only its evaluation reads: when nothing else changed, the stage
  # runs again on its trained run (status 'reeval') instead of being refused or retrained.
  eval_fields: tuple = ()
  # Fields (dotted) under its `config_keys` that it never reads: left out of its key (and of
  # its readers', unless they read them). E.g. the text stage keys "lm" less Being-VL's fields.
  ignores: tuple = ()


_DATA = ("seed", "data.resolution", "data.num_train", "data.num_validation", "data.num_test")
# lm fields that only Being-VL's runs (the lm stage) read, and those that only V2L's frozen LM
# (stage 0 continued: the text_icl stage) reads. Stage 0 (the text stage) reads neither, so a
# change of one retrains only the stages that read it.
_BEING_VL = tuple(f"lm.{k}" for k in (
    "stage_steps", "stage_lrs", "single_stage_lr", "stage_tasks", "first_frac", "vqa_questions",
    "vqa_branches", "runs", "num_eval", "eval_batch_size", "max_answer_tokens",
    "max_caption_tokens", "report_examples"))
_V2L_LM = ("lm.text_phases",)
# dit fields that only the DiT's designs read, not the pixel decoder (`dit.decoder`). A dit
# field missing here keys the pixel_decoder stage too (a needless retrain, never a stale one);
# tests/test_resume_rule.py checks that the list covers the tiny config's dit section.
_DIT_ONLY = tuple(f"dit.{k}" for k in (
    "designs", "variant", "model", "num_queries", "query_init_std", "prompt_template",
    "prompt_len", "batch_size", "data_shards", "total_steps", "lr", "warmup_steps",
    "final_lr_frac", "grad_clip", "weight_decay", "cfg_dropout", "time_sampling", "shift",
    "sample_steps", "guidance", "num_samples", "num_eval", "report_prompts", "ckpt_every"))

# In pipeline order: a stage reads the artifacts of those before it.
STAGES = {
    "data": Stage(data_stage.run_stage, _DATA + ("data", "tokenizer"),
                  outputs=("data/tfds", "tokenizer/text.model"), owns=("data", "tokenizer")),
    "text": Stage(lm_stage.run_text_stage, ("seed", "lm"), reads=("data",),
                  outputs=("text/ckpt",), owns=("text",), trains=True, collective=True,
                  ignores=_BEING_VL + _V2L_LM),
    "vq": Stage(vq_stage.run_stage, _DATA + ("vq",),
                outputs=("vq/codes_*.npy", "vq/codes_meta.json"), owns=("vq",), trains=True,
                collective=True),
    "bpe": Stage(bpe_stage.run_stage, ("seed", "data.resolution", "bpe"), reads=("vq",),
                 outputs=("bpe/bpe.json", "bpe/tokens_*.npz"), owns=("bpe",), collective=True),
    "lm": Stage(lm_stage.run_stage, ("seed", "lm"), reads=("data", "text", "vq", "bpe"),
                outputs=("lm/*/result.json",), owns=("lm",), trains=True, collective=True,
                ignores=_V2L_LM),
    "clip": Stage(clip_stage.run_stage, _DATA + ("clip",), reads=("data",),
                  outputs=("clip/ckpt",), owns=("clip",), trains=True, collective=True),
    "pixel_decoder": Stage(dit_stage.run_decoder_stage, ("seed", "dit", "clip"),
                           reads=("data", "clip"),
                           outputs=("pixel_decoder/ckpt", "pixel_decoder/feature_stats.json"),
                           owns=("pixel_decoder",), trains=True, collective=True,
                           ignores=_DIT_ONLY),
    "text_icl": Stage(v2l_stage.run_lm_stage, ("seed", "lm"), reads=("data", "text"),
                      outputs=("text_icl/ckpt",), owns=("text_icl",), trains=True,
                      collective=True, ignores=_BEING_VL),
    "dit": Stage(dit_stage.run_stage, ("seed", "dit", "clip"),
                 reads=("data", "vq", "lm", "clip", "pixel_decoder"),
                 outputs=("dit/*/result.json",), owns=("dit",), trains=True, collective=True),
    "v2l": Stage(v2l_stage.run_stage, ("seed", "v2l", "clip"),
                 reads=("data", "text", "text_icl", "clip"),
                 outputs=("v2l/fewshot.json",), owns=("v2l",), trains=True, collective=True,
                 eval_fields=tuple(f"v2l.{k}" for k in v2l_train.EVAL_FIELDS)),
}


def parse_stages(spec, what: str = "config.stages") -> list[str]:
  """`"data,vq"` (or a sequence) -> stage names in pipeline order; unknown names raise."""
  names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
  unknown = [n for n in names if n not in STAGES]
  if unknown or not names:
    raise ValueError(f"{what}={spec!r}: unknown or empty; expected a comma-separated "
                     f"subset of {list(STAGES)}")
  return [n for n in STAGES if n in names]


def recompute_allowed(config) -> set[str]:
  """Stages whose training runs `config.recompute` allows to delete: the named ones and every
  stage after the first of them ("all": every stage)."""
  spec = str(config.get("recompute", "") or "").strip()
  if not spec:
    return set()
  if spec == "all":
    return set(STAGES)
  first = parse_stages(spec, "config.recompute")[0]
  order = list(STAGES)
  return set(order[order.index(first):])


def config_keys(name: str) -> tuple:
  """A stage's config fields and those of every stage it reads from, transitively."""
  return tuple(sorted(set().union(*(STAGES[s].config_keys for s in _closure(name)))))


def _closure(name: str) -> set:
  """`name` and every stage it reads from, transitively."""
  return {name}.union(*(_closure(up) for up in STAGES[name].reads))


def config_ignores(name: str) -> tuple:
  """Fields under `config_keys(name)` left out of its key: for each key, the fields that every
  stage of `_closure(name)` keying it ignores (a field one of them reads stays in)."""
  out = set()
  for k in config_keys(name):
    sets = [{f for f in STAGES[s].ignores if f.startswith(k + ".")}
            for s in _closure(name) if k in STAGES[s].config_keys]
    out |= set.intersection(*sets)
  return tuple(sorted(out))


def _stage_key(config, name, inputs):
  key = manifest.stage_key(manifest.config_dict(config), config_keys(name), inputs)
  for field in config_ignores(name):
    _drop(key["config"], field)
  return key


def _drop(config_part: dict, field: str):
  """Removes dotted `field` from a key's config part (keyed by dotted paths: "lm", "v2l.lr")."""
  for k in config_part:
    if field.startswith(k + "."):
      d, *path, leaf = [config_part[k]] + field[len(k) + 1:].split(".")
      for part in path:
        d = d.get(part) if isinstance(d, dict) else None
      if isinstance(d, dict):
        d.pop(leaf, None)


def _config_part(config, name):
  return _stage_key(config, name, {})["config"]


def _training_part(name, config_part: dict) -> dict:
  """A stage key's config part less the stage's `eval_fields`: what its trained run is made of."""
  out = copy.deepcopy(config_part)
  for field in STAGES[name].eval_fields:
    if field in out:
      out[field] = "<evaluation>"
    _drop(out, field)
  return out


def _evaluation_only(name, old: dict, new: dict) -> bool:
  """Keys `old` -> `new` of stage `name` differ in its `eval_fields` alone."""
  return (bool(STAGES[name].eval_fields) and old.get("inputs") == new["inputs"]
          and _training_part(name, old.get("config", {})) == _training_part(name, new["config"]))


def _key(config, workdir, name):
  """The current key of stage `name`; None when an upstream stage is not done."""
  inputs = {}
  for up in STAGES[name].reads:
    m = manifest.load(workdir, up)
    if m is None or m["status"] != "done" or m["key"] != _key(config, workdir, up):
      return None
    inputs[up] = fileio.value_digest(m["outputs"])
  return _stage_key(config, name, inputs)


def _has_work(workdir, name) -> bool:
  return any(os.path.exists(os.path.join(workdir, p)) for p in STAGES[name].owns)


def _refusal(name, workdir, changes) -> str:
  dirs = ", ".join(os.path.join(workdir, p) for p in STAGES[name].owns)
  return (f"stage {name!r}: {dirs} holds a training run made from other inputs:\n  "
          + "\n  ".join(changes) +
          f"\nRetraining deletes it. To retrain {name!r} and recompute every stage after it, "
          f"rerun the same command with --config.recompute={name} (or restore the setting "
          "above to keep the run).")


def _preflight(config, workdir, names, allowed):
  """Refuses, before anything is written, a selected training stage whose config changed."""
  for name in names:
    if not STAGES[name].trains or name in allowed or not _has_work(workdir, name):
      continue
    m = manifest.load(workdir, name)
    want = {"config": _config_part(config, name)}
    if m is None or (_training_part(name, m["key"]["config"])
                     != _training_part(name, want["config"])):
      changes = manifest.describe_changes(
          None if m is None else {"config": m["key"]["config"]}, want)
      raise ValueError(_refusal(name, workdir, changes))


def _discard(workdir, name):
  """Deletes a stage's outputs, manifest and report section (before recomputing it)."""
  for p in STAGES[name].owns:
    shutil.rmtree(os.path.join(workdir, p), ignore_errors=True)
  manifest.remove(workdir, name)
  report.remove_section(workdir, name)


def _status(config, workdir, name):
  """(status, reasons, key) of stage `name` under `config`: 'done' (skip), 'resume' (an
  interrupted run), 'report' (done, its outputs intact, its report section missing: run again
  on its outputs), 'reeval' (done, its outputs intact, only its `eval_fields` changed: run
  again on its trained run), 'stale' (recompute) or 'blocked' (an upstream stage is not up to
  date)."""
  key = _key(config, workdir, name)
  if key is None:
    return "blocked", [], None
  m = manifest.load(workdir, name)
  changes = [] if m is not None and m["key"] == key else manifest.describe_changes(
      None if m is None else m["key"], key)
  if changes and (m is None or not _evaluation_only(name, m["key"], key)):
    return "stale", changes, key
  if m["status"] != "done":
    return "resume", ["interrupted"] + changes, key
  changed = manifest.changed_outputs(workdir, m, STAGES[name].outputs)
  if changed:
    return "stale", [f"output {p} differs from what the stage wrote" for p in changed], key
  if changes:
    return "reeval", ["only evaluation settings changed"] + changes, key
  if report.section_metrics(workdir, name) is None:
    return "report", ["its report section is missing"], key
  return "done", [], key


def run_one(config, workdir, name, allowed) -> dict:
  """Brings stage `name` up to date (skip, resume or recompute); returns its metrics.

  Only training stages resume (from their checkpoints); the others start over, so a file
  torn by a crash is never reused.
  """
  status, reasons, key = _status(config, workdir, name)
  if status == "blocked":
    ups = ", ".join(STAGES[name].reads)
    raise ValueError(f"stage {name!r} reads the outputs of {ups}, which are not up to date "
                     f"for this config in {workdir}: add them to --config.stages")
  if status == "done":
    logging.info("stage %s: up to date, skipped", name)
    return report.section_metrics(workdir, name)
  parallel.sync(f"stage {name}: status read")  # by every process, before process 0 writes
  if not parallel.is_primary():
    metrics = STAGES[name].run(config, workdir) if STAGES[name].collective else None
    parallel.sync(f"stage {name}: done")
    return metrics if metrics is not None else report.section_metrics(workdir, name)
  try:
    return _run_primary(config, workdir, name, allowed, status, reasons, key)
  finally:
    parallel.sync(f"stage {name}: done")


def _run_primary(config, workdir, name, allowed, status, reasons, key) -> dict:
  """`run_one` on process 0: discards or resumes, runs the stage, writes its manifest."""
  m = manifest.load(workdir, name) or {}
  seconds = 0.0
  # 'report': its outputs match the manifest's digests, so nothing is torn: the stage runs
  # again on them (the data stage reuses its dataset and tokenizer) rather than rebuilding
  # them, which would change their bytes (TFDS serialises tf.Example maps in hash order) and so
  # the inputs of every stage after it.
  # 'reeval': the same, on its trained run, with new evaluation settings.
  if status in ("report", "reeval") or (status == "resume" and STAGES[name].trains):
    seconds = float(m.get("seconds", 0.0))
    what = ("evaluating its trained run again" if status == "reeval" else
            "resuming" if STAGES[name].trains else "rerun on its outputs")
    logging.info("stage %s: %s (%s)", name, what, "; ".join(reasons))
  else:
    if status == "stale" and STAGES[name].trains and _has_work(workdir, name) and (
        name not in allowed):
      raise ValueError(_refusal(name, workdir, reasons))
    if _has_work(workdir, name) or m:
      logging.warning("stage %s: recomputing (%s)", name, "; ".join(reasons))
    _discard(workdir, name)
  manifest.save(workdir, name, {"stage": name, "status": "running", "key": key,
                                "seconds": seconds})
  t0 = time.perf_counter()
  try:
    metrics = STAGES[name].run(config, workdir)
  finally:
    seconds += time.perf_counter() - t0
    if os.path.exists(manifest.path(workdir, name)):
      manifest.save(workdir, name, dict(manifest.load(workdir, name), seconds=seconds))
  manifest.save(workdir, name, {
      "stage": name, "status": "done", "key": key, "seconds": round(seconds, 2),
      "finished": time.strftime("%F %T"),
      "outputs": manifest.output_digests(workdir, STAGES[name].outputs)})
  logging.info("stage %s done in %.1fs: %s", name, seconds, metrics)
  return metrics


def train_and_evaluate(config, workdir: str) -> str:
  """Runs `config.stages` in order; returns the path of the report's index.html."""
  names = parse_stages(config.stages)
  allowed = recompute_allowed(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir={workdir!r} is a file; expected a directory")
  if config.get("longer_run"):
    longer_run.read(config.longer_run)  # a bad record is refused now, not after the stages
  if config.get("claims_record"):
    seed_claims.read(config.claims_record)
  workers = parallel.stage_workers(config)
  os.makedirs(workdir, exist_ok=True)
  _preflight(config, workdir, names, allowed)
  run_stages(names, lambda name: run_one(config, workdir, name, allowed), workers)
  for name in STAGES:
    if name not in names and parallel.is_primary() and (
        _status(config, workdir, name)[0] != "done"):
      # Not run now and not made from this config: its numbers must not show beside it.
      if report.remove_section(workdir, name):
        logging.warning("stage %s is not up to date for this config: its report section "
                        "was removed (run it with --config.stages)", name)
  return _run_section(config, workdir)


@contextlib.contextmanager
def _on_ctrl_c(handler: Callable[[], None]):
  """Calls `handler()` on SIGINT while inside, where Python's own handler is set (a caller's own
  handler, or SIGINT ignored, is left as it is).

  Python's handler raises KeyboardInterrupt in whatever the main thread runs at that moment; when
  that is a gc callback (jax registers one) the exception is printed and dropped, and a run
  waiting on its stage threads would go on as if no Ctrl-C came.
  """
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    yield
    return
  previous = signal.signal(signal.SIGINT, lambda signum, frame: handler())
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)


def run_stages(names, run, workers: int):
  """Calls `run(name)` for every stage of `names` (pipeline order), up to `workers` at once,
  each once every stage it reads among `names` has returned.

  When a stage raises, no stage starts after it; those running finish (their work is kept),
  then its error is raised. Ctrl-C ends the process at once (rerun the command to resume).
  """
  if workers == 1:
    for name in names:
      logging.info("=== stage %s ===", name)
      run(name)
    return
  pending, running, done, failed = list(names), {}, set(), []

  def interrupted():
    logging.error("interrupted while %s ran; rerun the same command to resume",
                  ", ".join(running.values()) or "no stage")
    logging.flush()
    os._exit(130)  # the pool's threads would otherwise run their stages to the end

  with futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stage") as pool, \
      _on_ctrl_c(interrupted):
    try:
      while pending or running:
        for name in list(pending):
          if failed or len(running) >= workers:
            break
          if all(up in done for up in STAGES[name].reads if up in names):
            pending.remove(name)
            logging.info("=== stage %s ===%s", name, f" (beside {', '.join(running.values())})"
                         if running else "")
            running[pool.submit(run, name)] = name
        if not running:  # only after a failure: what is left waits on it
          break
        # With a timeout: a Ctrl-C that the kernel hands to another thread is only seen by
        # this one when it wakes.
        finished, _ = futures.wait(running, timeout=0.5, return_when=futures.FIRST_COMPLETED)
        for f in finished:
          name = running.pop(f)
          if f.exception() is None:
            done.add(name)
          else:
            failed.append(f.exception())
            logging.error("stage %s failed: %s%s", name, f.exception(),
                          f"; waiting for {', '.join(running.values())} to finish"
                          if running else "")
    except KeyboardInterrupt:  # a SIGINT handler of the caller's own that raises it
      interrupted()
  if failed:
    raise failed[0]


def _run_section(config, workdir):
  if not parallel.is_primary():  # process 0 writes the report
    return os.path.join(workdir, "report", "index.html")
  rows, metrics = [], {}
  for name in STAGES:
    m = manifest.load(workdir, name)
    if m is not None and m["status"] == "done" and report.section_metrics(workdir, name):
      rows.append((name, m["seconds"], m.get("finished", "")))
      metrics[f"time_s.{name}"] = m["seconds"]
  config_html = (f"<details><summary>config</summary><pre class='small'>"
                 f"{html.escape(str(config))}</pre></details>")
  workers = parallel.stage_workers(config)
  overlap = (f"<p class='small'>Up to {workers} stages ran at once (those that do not read each "
             "other's outputs): their seconds overlap, and a stage that ran beside another "
             "took longer than it would alone.</p>" if workers > 1 else "")
  index = report.add_section(
      workdir, key="run", title="Run", order=0, metrics=metrics,
      html=report.table(["stage", "seconds (all runs of it)", "finished"], rows) + overlap
      + config_html)
  # Order < 0: shown right below the claims, which they qualify (one seed; a short run).
  if config.get("claims_record"):
    index = report.add_section(
        workdir, key="seed_claims", title="The seed's claims over LM seeds (a recorded run)",
        order=-2, html=seed_claims.to_html(seed_claims.read(config.claims_record), config))
  else:
    report.remove_section(workdir, "seed_claims")  # rebuilds the page when it had one
  if not config.get("longer_run"):
    report.remove_section(workdir, "longer_run")
    return index
  return report.add_section(
      workdir, key="longer_run", title="What a longer run gives", order=-1,
      html=longer_run.to_html(report.read_metrics(workdir), longer_run.read(config.longer_run)))
