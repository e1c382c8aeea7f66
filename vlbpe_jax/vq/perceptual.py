"""LPIPS-style perceptual distance (Zhang et al. 2018, VGG16 variant) with weights from a file.

The weights are never random: `load_lpips(path)` reads one safetensors file holding
torchvision's VGG16 `features.{i}.weight|bias` (OIHW) and the LPIPS linear heads
`lin{k}.model.1.weight` ([1, C, 1, 1]). Build it once where torch is installed:

  feats = torchvision.models.vgg16(weights="IMAGENET1K_V1").features.state_dict()
  lins = torch.load("lpips/weights/v0.1/vgg.pth")
  safetensors.torch.save_file({**{f"features.{k}": v for k, v in feats.items()}, **lins}, p)

Without a file the training config sets `vq.perceptual_weight = 0` and this module is unused.
"""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np

# torchvision vgg16.features: conv indices and the ReLU taps LPIPS reads (relu1_2 ... relu5_3).
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
POOL_AFTER = (2, 7, 14, 21)  # indices of convs followed by a 2x2 max-pool
TAPS = (2, 7, 14, 21, 28)
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def load_lpips(path: str) -> dict:
  """Reads the safetensors file described above -> {"vgg": [(kernel HWIO, bias)], "lin": [w]}."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise ValueError(f"vq.perceptual_weights={path!r}: no such file")
  t = load_file(path)
  need = [f"features.{i}.{p}" for i in VGG16_CONVS for p in ("weight", "bias")]
  need += [f"lin{k}.model.1.weight" for k in range(len(TAPS))]
  missing = [k for k in need if k not in t]
  if missing:
    raise ValueError(f"perceptual weights {path}: missing keys {missing[:6]}"
                     f"{' ...' if len(missing) > 6 else ''} (expected torchvision vgg16 "
                     "'features.N.weight' and LPIPS 'linK.model.1.weight')")
  vgg = [(np.transpose(t[f"features.{i}.weight"], (2, 3, 1, 0)), t[f"features.{i}.bias"])
         for i in VGG16_CONVS]
  lin = [t[f"lin{k}.model.1.weight"].reshape(-1) for k in range(len(TAPS))]
  return {"vgg": [tuple(jnp.asarray(a, jnp.float32) for a in p) for p in vgg],
          "lin": [jnp.asarray(w, jnp.float32) for w in lin]}


def _features(vgg, x):
  """x: [B, H, W, 3] in [-1, 1] -> the five tapped ReLU maps."""
  h = (x - _SHIFT) / _SCALE
  out = []
  for idx, (kernel, bias) in zip(VGG16_CONVS, vgg):
    h = jax.lax.conv_general_dilated(h, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + bias)
    if idx in TAPS:
      out.append(h)
    if idx in POOL_AFTER:
      h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  return out


def lpips(params, x, y):
  """Perceptual distance per image: x, y [B, H, W, 3] in [-1, 1] -> [B]."""
  chex.assert_equal_shape([x, y])
  unit = lambda f: f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
  total = 0.0
  for fx, fy, w in zip(_features(params["vgg"], x), _features(params["vgg"], y), params["lin"]):
    d = jnp.square(unit(fx) - unit(fy))  # [B, h, w, C]
    total = total + jnp.mean(jnp.einsum("BHWC,C->BHW", d, w), axis=(1, 2))
  return total
