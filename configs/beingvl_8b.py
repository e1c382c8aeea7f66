"""Being-VL at Llama-3.1-8B size: the unified LM's stage-3 step (all weights) on a TPU slice or
8 H100s, checked ahead of time (no such hardware or checkpoint needed here):

  python benchmarks/realsize_memory.py --config=configs/beingvl_8b.py:target=v5p-64
  python benchmarks/realsize_memory.py --config=configs/beingvl_8b.py:target=h100x8,remat=dots
  pytest tests/test_realsize_compile.py   # lowers every target's step, checks its shardings

Args: target=v5p-64|v6e-64|h100x8 (mesh, batch, attention kernel), remat=full|dots|
dots_no_batch|none, scan=true|false, attention= (overrides the target's kernel), tiny (the same
layout at `mu` size on 8 CPU devices). Vocabulary: Llama-3's 128256 text rows + 8 special +
8192 VQ codes + 8192 visual BPE tokens; a 32x32 code grid is 1024 tokens, so 2048-token rows.
"""

import ml_collections

from vlbpe_jax import config_utils

# Per target: mesh, global batch (rows of seq_len tokens), attention kernel. 8B params + AdamW
# in fp32 are ~139 GB: FSDP over every chip of a slice; no tensor axis below 64 chips.
TARGETS = {
    "v5p-64": dict(mesh=[("data", -1), ("fsdp", 32), ("tensor", 1)], batch=256,
                   attention="splash"),
    "v6e-64": dict(mesh=[("data", -1), ("fsdp", 64), ("tensor", 1)], batch=256,
                   attention="splash"),
    "h100x8": dict(mesh=[("data", -1), ("fsdp", 8), ("tensor", 1)], batch=32,
                   attention="cudnn"),
    "cpu": dict(mesh=[("data", -1), ("fsdp", 4), ("tensor", 2)], batch=8,
                attention="blockwise"),
}


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, target="v5p-64", remat="full", scan=True, attention="",
                               tiny=False)
  tiny = arg.tiny
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "lm"  # the stage this file sizes (its data comes from the tiny pipeline's stages)
  c.target = config_utils.target("cpu" if tiny else arg.target)  # chip, devices, HBM
  t = TARGETS[c.target.name]
  c.mesh = t["mesh"]
  c.lm = dict(
      variant="mu" if tiny else "llama3_8b",  # vlbpe_jax/lm/config.py:VARIANTS
      # LMConfig overrides: bf16 compute over fp32 master weights, scanned layers (one compiled
      # layer), rematerialisation (lm/model.py: none/full/dots/dots_no_batch).
      model=dict(dtype="bfloat16", scan_layers=arg.scan, remat_policy=arg.remat,
                 attention_impl=arg.attention or t["attention"]),
      vocab=dict(text=256 if tiny else 128_256, special=8, vq=64 if tiny else 8192,
                 bpe=64 if tiny else 8192),
      seq_len=128 if tiny else 2048,
      batch_size=t["batch"],
      stage_steps=(2, 2, 2) if tiny else (10_000, 10_000, 20_000),
      stage_lrs=(1e-3, 2e-5, 1e-5),  # Being-VL: new rows fast, then the whole model slowly
      first_frac=0.25,
      warmup_steps=1 if tiny else 500,
      final_lr_frac=0.1,
      grad_clip=1.0,
      weight_decay=0.0,
      b1=0.9,
      b2=0.95,
  )
  return c
