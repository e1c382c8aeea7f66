"""VQ-GAN tokenizer on 64x64 shapes (f=4 -> 16x16 codes, 512 codes), sized for a 2-core CPU.

  python -m vlbpe_jax.vq.train --config=configs/vq_tiny.py --workdir=$W
  python -m vlbpe_jax.vq.train --config=configs/vq_tiny.py:tiny --workdir=$W   # 3 steps, tests
  python -m vlbpe_jax.main --config=configs/vq_tiny.py --workdir=$W   # the vq stage + report

No GAN and no perceptual loss here: on flat-colour shapes L2 + quantisation trained fastest in
our runs; both are switched on by `vq.disc_weight` / `vq.perceptual_weight`. The `tiny_p4*`
autoencoder (4x4 pixel patches into channels) runs about twice the steps per CPU second of
`tiny` at the same quality per step; figures in BENCHMARKS.md "VQ-GAN".
"""

import ml_collections

from vlbpe_jax import config_utils


def vq_config(tiny: bool = False) -> ml_collections.ConfigDict:
  """The `config.vq` section (configs/tiny.py includes it as is)."""
  return ml_collections.ConfigDict(dict(
      variant="mu" if tiny else "tiny_p4_patch",  # autoencoder.VARIANTS; configs/tiny.py says why
      codebook_size=64 if tiny else 512,
      code_dim=8 if tiny else 16,
      l2_normalize=True,  # cosine lookup (V2L): codes stay in use
      beta=0.25,  # commitment
      dtype="float32",  # compute dtype; "bfloat16" halves activation memory on accelerators
      recon_loss="l2",  # PSNR is an L2 measure; l1 trained ~2 dB lower in 400 steps here
      perceptual_weight=0.0,  # > 0 needs perceptual_weights (a safetensors VGG16+LPIPS file)
      perceptual_weights="",
      disc_weight=0.1 if tiny else 0.0,  # > 0: PatchGAN (hinge), taming's adaptive weight
      disc_start=1,  # step from which the GAN losses count
      disc_variant="tiny",
      disc_lr=1e-4,
      restart_every=10,  # dead-code restart period (steps); 0 = never
      restart_threshold=0.1,  # restart codes used < 10% of a uniform share
      usage_decay=0.95,  # running usage per code (window ~20 steps)
      restart_until=3 if tiny else 5000,  # no restarts after this step: codes settle
      lr=3e-3,
      warmup_steps=2 if tiny else 80,
      b1=0.9,
      b2=0.99,
      grad_clip=10.0,  # only against spikes
      batch_size=8 if tiny else 4,  # small batches, many steps: best per CPU second
      data_shards=0,  # n data shards (0: one per process): same batches on P processes, P | n
      total_steps=3 if tiny else 6400,
      log_every=1 if tiny else 20,
      eval_every=3 if tiny else 3200,
      ckpt_every=3 if tiny else 3200,
      grid_images=8,  # validation pairs in each PNG grid
      progress=not tiny,  # tqdm bar
  ))


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "vq"  # pipeline stages for vlbpe_jax.main (the VQ renders its own shapes)
  # `:tiny` (tests): 32 px, a PatchGAN from step 1 so that every loss path runs.
  c.data = dict(resolution=32 if arg.tiny else 64, num_train=64 if arg.tiny else 2000,
                num_validation=16 if arg.tiny else 64, num_test=16 if arg.tiny else 64)
  # Device mesh; logical rules: vlbpe_jax/parallel.py:LOGICAL_AXIS_RULES. Batch sizes are
  # global and fixed by this file: each stage fits the -1 axis ("data") to its batch, i.e. to
  # the largest divisor of the batch that divides the device count, and the devices left over
  # replicate its shards (an added "replica" axis), e.g. batch 4 on 8 devices: data=4,
  # replica=2; on 6: data=2, replica=3 (parallel.py:plan_mesh, logged as "mesh ..."). Explicit
  # sizes are kept: their product must be the device count and split every batch.
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  c.vq = vq_config(arg.tiny)
  return c
