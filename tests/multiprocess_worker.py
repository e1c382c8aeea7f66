"""One process of a multi-process test run (tests/test_multiprocess.py starts two of them).

  VLBPE_DISTRIBUTED=1 VLBPE_NUM_PROCESSES=2 VLBPE_PROCESS_ID=0 JAX_COORDINATOR_ADDRESS=... \\
    python tests/multiprocess_worker.py WORKDIR lm:A:2 lm:B:0

Each `job:name:stop` runs a job into `WORKDIR/name` (stop: stop_at_step, 0 = to the end). The
same functions run in the test's own process for the one-process, 8-device reference.
"""

import dataclasses
import faulthandler
import functools
import importlib.util
import os
import signal
import sys
import time

import jax

from vlbpe_jax import parallel


def lm_config():
  import lm_train_helpers as helpers  # pylint: disable=g-import-not-at-top
  # lm.data_shards=2: the same global batches in 1 process (both shards) and in 2 (one each).
  config = helpers.make_config(text_steps=4, batch_size=8, data_shards=2, seq_len=64)
  config.lm.model.depth = 1
  config.mesh = [("data", 1), ("fsdp", 8), ("tensor", 1)]  # weights split over both processes
  return config


@functools.lru_cache()
def _lm_setup(workdir: str):
  """(config, trainer, make_iter), built once per process so that its jitted steps compile
  once for all jobs."""
  import lm_train_helpers as helpers  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.lm import train  # pylint: disable=g-import-not-at-top
  config = lm_config()
  with open(os.path.join(workdir, "t.model"), "rb") as f:
    tok = text_tokenizer.TextTokenizer(f.read())
  trainer = train.Trainer(config, train.make_model(config, tok),
                          parallel.mesh_from_config(config.mesh))
  return config, trainer, train.iterator_fn(config, tok, helpers.examples("train"), None)


def run_lm(workdir: str, name: str, stop_at_step: int | None = None):
  """Stage 0 of the LM (text only, 4 steps) into `workdir/name`; `workdir/t.model` exists."""
  from vlbpe_jax.lm import train  # pylint: disable=g-import-not-at-top
  config, trainer, make_iter = _lm_setup(workdir)
  train.run_plan(config, os.path.join(workdir, name), trainer, train.plan_of(config, "text"),
                 make_iter, stop_at_step=stop_at_step or None, name=name,
                 must_match=train.TEXT_MUST_MATCH)


def vq_config():
  config = _load_config("vq_tiny", "tiny")  # 3 steps, evaluation and a checkpoint at step 3
  config.mesh = [("data", 4), ("fsdp", 2), ("tensor", 1)]
  config.vq.data_shards = 2
  config.vq.disc_weight = 0.0  # the PatchGAN's compile would double the test's time
  return config


def run_vq(workdir: str, name: str, stop_at_step: int | None = None):
  """The tiny VQ (to step 3, or resumed from its checkpoint) into `workdir/name/vq`; its
  validation metrics go to `workdir/name/result.json`."""
  from vlbpe_jax import fileio  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.vq import train  # pylint: disable=g-import-not-at-top
  del stop_at_step  # the VQ runs to vq.total_steps
  val = train.train_and_evaluate(vq_config(), os.path.join(workdir, name))
  if parallel.is_primary():
    fileio.write_json(os.path.join(workdir, name, "result.json"), val)


def clip_config():
  config = _load_config("tiny", "tiny")  # the tiny CLIP: 1-layer towers, batch 16
  config.clip.total_steps = 3
  config.clip.data_shards = 2  # as dit.data_shards below
  config.mesh = [("data", 4), ("fsdp", 2), ("tensor", 1)]
  return config


def run_clip(workdir: str, name: str, stop_at_step: int | None = None):
  """The tiny CLIP (3 steps) into `workdir/name/clip`; `workdir/name` holds the data stage's
  dataset and tokenizer."""
  from vlbpe_jax.clip import train  # pylint: disable=g-import-not-at-top
  train.train(clip_config(), os.path.join(workdir, name), stop_at_step=stop_at_step or None)


def dit_config():
  import dit_helpers  # pylint: disable=g-import-not-at-top
  # dit.data_shards=2: the same global batches in 1 process (both shards) and in 2 (one each).
  config = dit_helpers.configure(_load_config("tiny", "tiny"), model=dict(depth=1),
                                 total_steps=3, data_shards=2)
  config.mesh = [("data", 4), ("fsdp", 2), ("tensor", 1)]  # fsdp within, data across processes
  return config


@functools.lru_cache()
def _dit_setup(workdir: str):
  """(config, setup of the fm design, targets), built once per process so that its jitted step
  compiles once for all jobs; the frozen backbone is a 1-layer LM at its init
  (tests/dit_helpers.py, as tests/test_dit_train.py)."""
  import dit_helpers  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.dit import targets  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.dit import train  # pylint: disable=g-import-not-at-top
  config = dit_config()
  mesh = parallel.mesh_from_config(config.mesh)
  x0 = dit_helpers.targets()
  s = train.setup(config, workdir, "fm", shape=x0.shape[1:], stats=targets.stats_of(x0),
                  backbone=dit_helpers.backbone(dit_helpers.lm(), mesh), mesh=mesh)
  return config, s, x0


def run_dit(workdir: str, name: str, stop_at_step: int | None = None):
  """The tiny DiT's fm design (3 steps) into `workdir/name`."""
  import dit_helpers  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.dit import train  # pylint: disable=g-import-not-at-top
  config, s, x0 = _dit_setup(workdir)
  train.train(config, dataclasses.replace(s, run_dir=os.path.join(workdir, name)),
              dit_helpers.CAPTIONS, x0, stop_at_step=stop_at_step or None)


def decoder_config():
  config = _load_config("tiny", "tiny")
  config.data.resolution, config.clip.grid = 16, 4  # 4x4 feature grids -> 16x16 pixels
  c = config.dit.decoder
  c.ch_mult = (1,)  # one level (f = 4, its patch): compiles in ~60% of the time of two
  c.batch_size, c.total_steps = 8, 3
  c.data_shards = 2  # as dit.data_shards above
  config.mesh = [("data", 4), ("fsdp", 2), ("tensor", 1)]
  return config


@functools.lru_cache()
def _decoder_data():
  """16 (features [4, 4, 8], uint8 image [16, 16, 3]) pairs."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  return (rng.normal(1.0, 2.0, (16, 4, 4, 8)).astype(np.float32),
          rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))


def run_decoder(workdir: str, name: str, stop_at_step: int | None = None):
  """The BLIP3-o pixel decoder (3 steps) into `workdir/name/pixel_decoder`."""
  from vlbpe_jax.dit import decoder  # pylint: disable=g-import-not-at-top
  feats, images = _decoder_data()
  decoder.train_decoder(decoder_config(), os.path.join(workdir, name), feats, images,
                        stop_at_step=stop_at_step or None)


def v2l_config():
  config = _load_config("tiny", "tiny")
  config.data.resolution = 16  # the "tiny" V2L variant: 16 px -> 4x4 tokens
  c = config.v2l
  c.model = dict(ch_mult=(1,), patch=4)  # one level: compiles in ~70% of the time of two
  c.batch_size, c.total_steps = 8, 3
  c.data_shards = 2  # as dit.data_shards above
  config.mesh = [("data", 4), ("fsdp", 2), ("tensor", 1)]
  return config


@functools.lru_cache()
def _v2l_setup(workdir: str):
  """(config, setup, images, global_emb), built once per process so that its jitted step
  compiles once for all jobs: a random local table of 40 unit rows of width 16 (the CLIP's),
  16 random 16x16 images with 3 global embeddings each."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.v2l import train  # pylint: disable=g-import-not-at-top
  config = v2l_config()
  rng = np.random.default_rng(0)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
  local_emb = unit(rng.normal(size=(40, 16)))
  images = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
  global_emb = unit(rng.normal(size=(16, 3, 16)))
  s = train.setup(config, workdir, local_emb, mesh=parallel.mesh_from_config(config.mesh))
  return config, s, images, global_emb


def run_v2l(workdir: str, name: str, stop_at_step: int | None = None):
  """The V2L tokenizer (3 steps) into `workdir/name`."""
  from vlbpe_jax.v2l import train  # pylint: disable=g-import-not-at-top
  config, s, images, global_emb = _v2l_setup(workdir)
  train.train(config, dataclasses.replace(s, run_dir=os.path.join(workdir, name)), images,
              global_emb, stop_at_step=stop_at_step or None)


def bpe_codes():
  """60 tiny-config code grids (16x16 over 64 codes): 4x4 patches of 6 kinds plus noise."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  patches = rng.integers(0, 64, (6, 4, 4))
  g = patches[rng.integers(0, 6, (60, 4, 4))].transpose(0, 1, 3, 2, 4).reshape(60, 16, 16)
  noisy = rng.random(g.shape) < 0.15
  g[noisy] = rng.integers(0, 64, int(noisy.sum()))
  return g.astype(np.int32)


def bpe_config():
  config = _load_config("tiny", "tiny")
  config.bpe.num_merges = 60
  config.bpe.alpha = 1.0
  return config


def run_bpe(workdir: str, name: str, stop_at_step: int | None = None):
  """The pipeline's BPE stage on `workdir/name/vq/codes_*.npy` (all processes learn)."""
  from vlbpe_jax.bpe import stage  # pylint: disable=g-import-not-at-top
  del stop_at_step
  stage.run_stage(bpe_config(), os.path.join(workdir, name))


def run_bpe_cli(workdir: str, name: str, stop_at_step: int | None = None):
  """`python -m vlbpe_jax.bpe.learn` on `workdir/codes.npy` into `workdir/name.json`."""
  from vlbpe_jax.bpe import learn  # pylint: disable=g-import-not-at-top
  del stop_at_step
  learn.main([f"--codes={os.path.join(workdir, 'codes.npy')}", "--merges=60",
              f"--out={os.path.join(workdir, name + '.json')}", "--no_progress",
              "--min_count=3", "--offsets=0,1;1,0;1,1;1,-1"])


def _load_config(name, arg):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def run_data(workdir: str, name: str, stop_at_step: int | None = None):
  """The pipeline's `data` stage of configs/tiny.py:tiny into `workdir/name`."""
  from vlbpe_jax import train  # pylint: disable=g-import-not-at-top
  del stop_at_step
  config = _load_config("tiny", "tiny")
  config.stages = "data"
  train.train_and_evaluate(config, os.path.join(workdir, name))


def run_late(workdir: str, name: str, stop_at_step: int | None = None):
  """A sum over all 8 devices whose first call process 1 reaches `stop_at_step` seconds after
  process 0 (as after a slower compile): through `parallel.Together` when `name` is
  "together", straight through `jax.jit` when it is "bare" (gloo's 30 s rendezvous fails)."""
  import time  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  del workdir
  mesh = parallel.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  fn = jax.jit(lambda x: x.sum(), out_shardings=parallel.replicated(mesh))
  if name == "together":
    fn = parallel.Together(fn, "sum")
  rows = np.arange(4) + 4 * jax.process_index()  # global rows 0..7, one per device
  x = parallel.shard_batch(rows, mesh)
  if jax.process_index() == 1:
    time.sleep(stop_at_step)
  total = int(jax.device_get(fn(x)))
  if total != 28:
    raise AssertionError(f"sum over the 8 devices {total}, expected 28")


JOBS = {"late": run_late, "lm": run_lm, "vq": run_vq, "clip": run_clip, "dit": run_dit,
        "decoder": run_decoder, "v2l": run_v2l, "data": run_data, "bpe": run_bpe,
        "bpecli": run_bpe_cli}


def main(workdir, *jobs):
  # On a timeout the test sends SIGUSR1 before it kills: every thread's stack goes to the log.
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  parallel.initialize_distributed()
  jax.config.update("jax_threefry_partitionable", True)
  if os.environ.get("VLBPE_TEST_JAX_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["VLBPE_TEST_JAX_CACHE"])
  for job in jobs:
    kind, name, stop = job.split(":")
    print(f"{time.strftime('%H:%M:%S')} worker {jax.process_index()}: {job}", flush=True)
    JOBS[kind](workdir, name, int(stop))
  print(f"worker {jax.process_index()} done", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
