"""`LMConfig`: sizes (from a variant table), vocabulary layout and numerics of the decoder.

Vocabulary layout (ids): `text | special | VQ codes | BPE tokens`.
- `text_vocab`: the rows of the pretrained text model, *including its own special tokens*
  (Llama's `<|begin_of_text|>` etc.). They live in the `text_embed` / `text_head` tables.
- `num_special` new special tokens (image begin/end, roles, ...), then `num_vq` VQ codes, then
  `num_bpe` visual BPE tokens. All these new rows live in `visual_embed` / `visual_head`, so
  "train only the new rows" (stage 1) is a plain parameter partition. New special tokens sit
  with the visual rows because they, too, start untrained.
- `new_text_ids`: text ids that are new to the model although the tokenizer holds them (our
  `<img>` `</img>`: appended to a loaded tokenizer, and never in text pretraining). Their input
  embeddings (and head rows) come from the small `new_text_embed` / `new_text_head` tables (one
  row per id, in order), which override the text rows at those ids and train with the visual
  rows (stages.py); the shadowed text rows are unused.
"""

import dataclasses

import jax.numpy as jnp

# name -> sizes (plus the pretrained model's own settings for the real Llama shapes).
VARIANTS = {
    "mu": dict(width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=192),
    # The demo's model (configs/tiny.py): the smallest shape whose train step reaches half of
    # the CPU's matmul rate in bf16 (BENCHMARKS.md), at about the step time of `mu` in fp32.
    "Ti": dict(width=128, depth=2, num_heads=2, num_kv_heads=1, mlp_dim=512),
    "S": dict(width=256, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=768),
    "B": dict(width=768, depth=12, num_heads=12, num_kv_heads=4, mlp_dim=2048),
    # Llama-3.2-1B shapes (BLIP3-o's study backbone).
    "1B": dict(width=2048, depth=16, num_heads=32, num_kv_heads=8, mlp_dim=8192,
               rope_theta=500_000.0, rope_scaling=(32.0, 1.0, 4.0, 8192),
               tie_embeddings=True, text_vocab=128_256),
    # Llama-3.1-8B shapes (Being-VL's backbone).
    "llama3_8b": dict(width=4096, depth=32, num_heads=32, num_kv_heads=8, mlp_dim=14_336,
                      rope_theta=500_000.0, rope_scaling=(8.0, 1.0, 4.0, 8192),
                      text_vocab=128_256),
    # LLaMA-2-7B shapes (V2L's frozen LM; its 32000-entry vocabulary is V2L's local codebook).
    "llama2_7b": dict(width=4096, depth=32, num_heads=32, num_kv_heads=32, mlp_dim=11_008,
                      text_vocab=32_000),
}

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = (None, "xla", "cudnn", "blockwise", "splash")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Decoder settings. `head_dim=None` means `width // num_heads`."""
  text_vocab: int = 256
  num_special: int = 0
  num_vq: int = 0
  num_bpe: int = 0
  new_text_ids: tuple[int, ...] = ()  # text ids served by `new_text_embed` (see above)
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None
  mlp_dim: int = 192
  norm_eps: float = 1e-5
  rope_theta: float = 10_000.0
  rope_scaling: tuple[float, float, float, int] | None = None  # (factor, low, high, old_len)
  qk_norm: bool = False
  qkv_bias: bool = False  # Qwen2
  tie_embeddings: bool = False
  init_std: float = 0.02
  dtype: str = "bfloat16"  # compute
  param_dtype: str = "float32"  # master weights
  attention_impl: str | None = None  # None/"xla"/"cudnn"/"blockwise"/"splash" (attention.py)
  scan_layers: bool = False
  remat_policy: str = "none"

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.width // self.num_heads)
    if self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
      if len(self.rope_scaling) != 4:
        raise ValueError(f"rope_scaling={self.rope_scaling}: expected (factor, low_freq_factor, "
                         "high_freq_factor, original_max_position)")
    for name in ("text_vocab", "width", "depth", "num_heads", "num_kv_heads", "mlp_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
    for name in ("num_special", "num_vq", "num_bpe"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)}: expected >= 0")
    ids = tuple(int(i) for i in self.new_text_ids)
    object.__setattr__(self, "new_text_ids", ids)
    if len(set(ids)) != len(ids) or any(not 0 <= i < self.text_vocab for i in ids):
      raise ValueError(f"new_text_ids={ids}: expected distinct ids in [0, "
                       f"text_vocab={self.text_vocab})")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim}: RoPE needs an even head dim")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of "
                       f"{ATTENTION_IMPLS}")
    jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # raises on unknown names

  @property
  def visual_vocab(self):
    """Rows of the new table: special + VQ + BPE."""
    return self.num_special + self.num_vq + self.num_bpe

  @property
  def vocab_size(self):
    return self.text_vocab + self.visual_vocab

  @property
  def special_start(self):
    return self.text_vocab

  @property
  def vq_start(self):
    return self.text_vocab + self.num_special

  @property
  def bpe_start(self):
    return self.vq_start + self.num_vq


def lm_config(variant="mu", **overrides):
  """`LMConfig` of a variant from `VARIANTS`, with field overrides (e.g. from `config.model`)."""
  if variant not in VARIANTS:
    raise ValueError(f"model.variant={variant!r} unknown; expected one of {sorted(VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(LMConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"model fields {unknown} unknown; expected some of {sorted(fields)}")
  return LMConfig(**{**VARIANTS[variant], **overrides})
