"""Feature-grid pooling for BLIP3-o's target (EVA-CLIP patch features 4x4-pooled to 8x8)."""

import chex
import jax.numpy as jnp


def pool_grid(feats, grid: int):
  """feats `[B, h, w, D]` -> `[B, grid, grid, D]`: mean over non-overlapping
  `(h / grid) x (w / grid)` windows (float32). h and w must be multiples of grid."""
  chex.assert_rank(feats, 4)
  _, h, w, d = feats.shape
  if not isinstance(grid, int) or grid < 1 or h % grid or w % grid:
    raise ValueError(f"pool_grid: grid={grid!r} must be a positive int dividing the feature "
                     f"grid h={h}, w={w}")
  x = feats.astype(jnp.float32).reshape(-1, grid, h // grid, grid, w // grid, d)
  return x.mean(axis=(2, 4))  # [B, grid, grid, D]
