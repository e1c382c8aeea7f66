"""DiT sizes: `DiTConfig`, the `VARIANTS` table and `config_for(variant, **overrides)`.

  config_for("blip3o")  # BLIP3-o 8B's DiT: 1792 wide, 24 layers, 28 heads, ~1.36B params
"""

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Sizes of the DiT. `grid` is the target's (H, W), used by samplers for the default shape."""
  dim: int = 64
  depth: int = 2
  heads: int = 4
  in_channels: int = 32
  grid: tuple[int, int] = (4, 4)
  patch_size: int = 1
  cond_dim: int = 64
  multiple_of: int = 32  # SwiGLU width: int(2 * 4 * dim / 3) (* ffn_dim_multiplier), rounded up
  ffn_dim_multiplier: float | None = None
  norm_eps: float = 1e-5
  qk_norm: bool = True
  # The per-head cross-attention gate's initial value, before tanh: 0 in Lumina-Next and
  # BLIP3-o (the condition's path opens as the gate trains; Adam moves it by ~lr a step).
  cross_gate_init: float = 0.0
  rope_theta: float = 10_000.0
  t_embed_dim: int = 256
  scan_layers: bool = False
  remat_policy: str = "none"  # "none" | "full" | "dots" | "dots_no_batch"
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def head_dim(self):
    return self.dim // self.heads

  @property
  def temb_dim(self):
    return min(self.dim, 1024)

  @property
  def ffn_dim(self):
    inner = int(2 * (4 * self.dim) / 3)  # diffusers <= 0.32 LuminaFeedForward (BLIP3-o)
    if self.ffn_dim_multiplier is not None:
      inner = int(self.ffn_dim_multiplier * inner)
    return self.multiple_of * -(-inner // self.multiple_of)


VARIANTS = {
    "tiny": dict(dim=64, depth=2, heads=4, in_channels=32, grid=(4, 4), cond_dim=64,
                 multiple_of=32),
    "S": dict(dim=384, depth=12, heads=6, in_channels=384, grid=(8, 8), cond_dim=384,
              multiple_of=256),
    # BLIP3-o 8B: EVA-CLIP target 8x8x1792, Qwen2.5-VL-7B hidden 3584 (NextDiTCrossAttnConfig).
    "blip3o": dict(dim=1792, depth=24, heads=28, in_channels=1792, grid=(8, 8), cond_dim=3584,
                   multiple_of=256),
}

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def config_for(variant, **overrides):
  """DiTConfig of a named variant with fields overridden; bad names/values raise ValueError."""
  if variant not in VARIANTS:
    raise ValueError(f"dit variant={variant!r} unknown; expected one of {sorted(VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(DiTConfig)}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"unknown DiTConfig fields {bad}; expected some of {sorted(fields)}")
  kw = dict(VARIANTS[variant], **overrides)
  kw["grid"] = tuple(kw["grid"])
  c = DiTConfig(**kw)
  if c.dim % c.heads or c.head_dim % 4:
    raise ValueError(f"dim={c.dim}, heads={c.heads}: head dim must be an integer multiple of 4")
  if c.remat_policy != "none" and c.remat_policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={c.remat_policy!r}; expected 'none' or one of "
                     f"{sorted(REMAT_POLICIES)}")
  return c
