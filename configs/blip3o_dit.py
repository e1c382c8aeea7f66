"""BLIP3-o's DiT (1.37B: 1792 wide, 24 layers, 28 heads) generating an 8x8x1792 CLIP grid from
64 learned queries read through a frozen Being-VL LM, on a TPU slice or 8 H100s, checked ahead
of time (no such hardware or checkpoint needed here):

  python benchmarks/realsize_memory.py --config=configs/blip3o_dit.py:target=v5p-64
  pytest tests/test_realsize_compile.py   # lowers every target's step, checks its shardings

Args: target=v5p-64|v6e-64|h100x8, backbone=1B|llama3_8b (the frozen LM; BLIP3-o 8B reads
Qwen2.5-VL-7B), remat=full|dots|dots_no_batch|none, scan=true|false, tiny (`tiny` DiT and `mu`
LM on 8 CPU devices). The step is the `fm` design's (vlbpe_jax/dit/train.py:loss_fn): the
queries' gradients flow back through the frozen LM; its parameters are an input, never trained.
"""

import ml_collections

from vlbpe_jax import config_utils

# Per target: mesh and global batch (BLIP3-o: 512). The DiT + AdamW in fp32 are ~22 GB, the
# frozen 1B LM 6 GB: FSDP over 8 chips, data parallel across groups of 8.
TARGETS = {
    "v5p-64": dict(mesh=[("data", -1), ("fsdp", 8), ("tensor", 1)], batch=512),
    "v6e-64": dict(mesh=[("data", -1), ("fsdp", 8), ("tensor", 1)], batch=512),
    "h100x8": dict(mesh=[("data", -1), ("fsdp", 8), ("tensor", 1)], batch=128),
    "cpu": dict(mesh=[("data", -1), ("fsdp", 4), ("tensor", 2)], batch=8),
}


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, target="v5p-64", backbone="1B", remat="full", scan=True,
                               tiny=False)
  tiny = arg.tiny
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "dit"
  c.target = config_utils.target("cpu" if tiny else arg.target)  # chip, devices, HBM
  t = TARGETS[c.target.name]
  c.mesh = t["mesh"]
  c.lm = dict(  # the frozen backbone (cond_dim = its width)
      variant="mu" if tiny else arg.backbone,
      model=dict(dtype="bfloat16", scan_layers=arg.scan, remat_policy=arg.remat,
                 attention_impl="xla"),
      vocab=dict(text=256 if tiny else 128_256, special=8, vq=64 if tiny else 8192,
                 bpe=64 if tiny else 8192),
  )
  c.clip = dict(grid=8, width=64 if tiny else 1792)  # target grid (EVA-CLIP 8x8x1792)
  c.dit = dict(
      variant="tiny" if tiny else "blip3o",  # vlbpe_jax/dit/config.py:VARIANTS
      model=dict(dtype="bfloat16", scan_layers=arg.scan, remat_policy=arg.remat),
      num_queries=64,
      query_init_std=0.02,
      prompt_len=16 if tiny else 112,
      batch_size=t["batch"],
      total_steps=3 if tiny else 400_000,
      lr=1e-4,  # BLIP3-o: 1e-4 cosine to 1e-5
      warmup_steps=1 if tiny else 1200,
      final_lr_frac=0.1,
      grad_clip=1.0,
      weight_decay=0.0,
      cfg_dropout=0.1,
      time_sampling="logit_normal",
      shift=1.0,
      sample_steps=30,
      log_every=1 if tiny else 100,
      ckpt_every=1000,
  )
  return c
