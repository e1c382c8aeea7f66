"""V2L at the paper's size: the tokenizer (VQGAN encoder/decoder, 128 px -> 16x16 codes) whose
local codebook is LLaMA-2-7B's 32000-subword vocabulary embedded by CLIP ViT-L/14 (E = 768),
on a TPU slice or 8 H100s, checked ahead of time (no such hardware or checkpoint needed here):

  python benchmarks/realsize_memory.py --config=configs/v2l_llama2_7b.py:target=h100x8
  pytest tests/test_realsize_compile.py   # lowers every target's step, checks its shardings

Args: target=v5p-64|v6e-64|h100x8, tiny (the `tiny` tokenizer on 8 CPU devices). The frozen
LLaMA-2-7B (lm.variant) only reads the tokens in context at evaluation; the train step holds
its vocabulary's CLIP table (32000 x 768, frozen, replicated) and trains the tokenizer alone.
"""

import ml_collections

from vlbpe_jax import config_utils

# Per target: mesh and global batch (the public code: 8 images per GPU). The tokenizer
# (~0.1B) is small: data parallel, with FSDP over a chip pair for the convolution kernels.
TARGETS = {
    "v5p-64": dict(mesh=[("data", -1), ("fsdp", 2), ("tensor", 1)], batch=256),
    "v6e-64": dict(mesh=[("data", -1), ("fsdp", 2), ("tensor", 1)], batch=256),
    "h100x8": dict(mesh=[("data", -1), ("fsdp", 2), ("tensor", 1)], batch=64),
    "cpu": dict(mesh=[("data", -1), ("fsdp", 2), ("tensor", 1)], batch=8),
}


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, target="v5p-64", tiny=False)
  tiny = arg.tiny
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "v2l"
  c.target = config_utils.target("cpu" if tiny else arg.target)  # chip, devices, HBM
  t = TARGETS[c.target.name]
  c.mesh = t["mesh"]
  c.data = dict(resolution=16 if tiny else 128)
  c.lm = dict(variant="mu" if tiny else "llama2_7b",  # frozen; its vocabulary is the codebook
              vocab=dict(text=256 if tiny else 32_000))
  c.clip = dict(embed_dim=16 if tiny else 768)  # CLIP ViT-L/14's joint embedding
  c.v2l = dict(
      variant="tiny" if tiny else "paper",  # v2l/model.py:VARIANTS
      model=dict(),
      num_global=5 if tiny else 21,
      global_dropout=0.25,
      quant_weight=1.0,
      perceptual_weight=0.0,  # LPIPS adds a frozen VGG16 (not sized here)
      disc_weight=0.0,
      batch_size=t["batch"],
      total_steps=3 if tiny else 100_000,
      lr=4.5e-4,
      warmup_steps=1 if tiny else 1000,
      final_lr_frac=0.1,
      grad_clip=10.0,
  )
  return c
