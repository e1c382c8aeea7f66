"""Per-channel standardisation of generation targets (CLIP features, VQ latents).

  stats = stats_of(x)            # {"mean": [C], "std": [C], "shape": [H, W, C]} (JSON-able)
  z = standardise(x, stats)      # what the DiT / regression head / pixel decoder see
  x = z * std + mean             # back to raw features

BLIP3-o feeds raw EVA-CLIP features to its DiT. Ours are standardised per channel: a few CLIP
channels span far larger ranges than the rest, and unit-variance targets match the flow's N(0, I)
noise.
"""

import numpy as np


def stats_of(x) -> dict:
  """Per-channel mean and std of raw targets [N, H, W, C] (and their item shape): a few CLIP
  channels have far larger ranges than the rest, and one scalar would leave those dominant."""
  flat = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])  # [N*H*W, C]
  return {"mean": flat.mean(0).tolist(), "std": np.maximum(flat.std(0), 1e-6).tolist(),
          "shape": list(np.shape(x)[1:])}


def standardise(x, stats):
  """Raw targets -> standardised float32 (per channel)."""
  return ((np.asarray(x) - np.asarray(stats["mean"])) / np.asarray(stats["std"])).astype(
      np.float32)


