"""Being-VL at Llama-3.2-1B size (BLIP3-o's study backbone): the unified LM's stage-3 step
(all weights) on a TPU slice or 8 H100s, checked ahead of time (no such hardware or checkpoint
needed here):

  python benchmarks/realsize_memory.py --config=configs/beingvl_1b.py:target=v5p-64
  python benchmarks/realsize_memory.py --config=configs/beingvl_1b.py:target=h100x8,remat=dots
  pytest tests/test_realsize_compile.py   # lowers every target's step, checks its shardings

Args: target=v5p-64|v6e-64|h100x8 (mesh, batch, attention kernel), remat=full|dots|
dots_no_batch|none, scan=true|false, attention= (overrides the target's kernel), tiny (the same
layout at `mu` size on 8 CPU devices). Vocabulary: Llama-3's 128256 text rows + 8 special +
8192 VQ codes + 8192 visual BPE tokens; a 32x32 code grid is 1024 tokens, so 2048-token rows.
"""

from vlbpe_jax import config_utils

# Per target: mesh, global batch (rows of seq_len tokens), attention kernel. 1.5B params +
# AdamW in fp32 are ~24 GB: FSDP over 8 chips, data parallel across groups of 8.
TARGETS = {
    "v5p-64": dict(mesh=[("data", -1), ("fsdp", 8), ("tensor", 1)], batch=256,
                   attention="splash"),
    "v6e-64": dict(mesh=[("data", -1), ("fsdp", 8), ("tensor", 1)], batch=256,
                   attention="splash"),
    "h100x8": dict(mesh=[("data", -1), ("fsdp", 8), ("tensor", 1)], batch=32,
                   attention="cudnn"),
    "cpu": dict(mesh=[("data", -1), ("fsdp", 4), ("tensor", 2)], batch=8,
                attention="blockwise"),
}


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, target="v5p-64", remat="full", scan=True, attention="",
                               tiny=False)
  return config_utils.beingvl_lm_config(arg, variant="1B", targets=TARGETS)
