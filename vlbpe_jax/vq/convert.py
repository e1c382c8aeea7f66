"""Imports pretrained VQ weights from safetensors in PyTorch layout.

Layouts (the Linen modules keep the PyTorch module names, so the mapping is by name):
  chameleon  Hugging Face `ChameleonForConditionalGeneration`: `model.vqmodel.encoder.*`,
             `model.vqmodel.quantize.embedding.weight`, `model.vqmodel.quant_conv.*`,
             `model.vqmodel.post_quant_conv.*` (the HF model has no decoder).
  taming     taming-transformers `VQModel` state dict saved as safetensors: `encoder.*`,
             `decoder.*`, `quantize.embedding.weight`, `quant_conv.*`, `post_quant_conv.*`
             (`loss.*`, the discriminator and LPIPS, is skipped).

  params = load_params("vq.safetensors", model, resolution=512)   # layout auto-detected

Conv kernels go from OIHW to HWIO, GroupNorm `weight` becomes `scale`; a missing, unexpected
or misshapen tensor raises a ValueError that lists every problem.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

LAYOUT_PREFIXES = {"chameleon": "model.vqmodel.", "taming": ""}
_PARTS = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")


def detect_layout(keys) -> str:
  if any(k.startswith(LAYOUT_PREFIXES["chameleon"]) for k in keys):
    return "chameleon"
  if any(k.startswith(_PARTS) for k in keys):
    return "taming"
  raise ValueError(f"cannot tell the checkpoint layout from keys like {sorted(keys)[:4]}; "
                   f"expected 'model.vqmodel.*' (chameleon) or 'encoder.*' (taming)")


def torch_to_flax_path(key: str) -> tuple[str, ...]:
  """'encoder.down.0.block.1.norm1.weight' -> ('encoder', 'down_0_block_1', 'norm1', 'scale')."""
  k = re.sub(r"\b(down|up)\.(\d+)\.(block|attn)\.(\d+)", r"\1_\2_\3_\4", key)
  k = re.sub(r"\b(down|up)\.(\d+)\.(downsample|upsample)", r"\1_\2_\3", k)
  k = re.sub(r"\bmid\.(block_1|attn_1|block_2)", r"mid_\1", k)
  path = k.split(".")
  if path[:2] == ["quantize", "embedding"]:
    return ("quantize", "embedding")
  module, leaf = path[-2], path[-1]
  if leaf == "weight":
    leaf = "scale" if module.startswith("norm") else "kernel"
  return tuple(path[:-1]) + (leaf,)


def torch_to_flax_array(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and x.ndim == 4:
    return np.transpose(x, (2, 3, 1, 0))  # OIHW -> HWIO
  return x


def convert(tensors: dict, layout: str | None = None) -> dict:
  """{torch key: array} -> flat {flax path tuple: array} (no shape checks)."""
  layout = layout or detect_layout(tensors)
  if layout not in LAYOUT_PREFIXES:
    raise ValueError(f"layout={layout!r} unknown; expected one of {sorted(LAYOUT_PREFIXES)}")
  prefix = LAYOUT_PREFIXES[layout]
  out = {}
  for key, x in tensors.items():
    if not key.startswith(prefix) or not key[len(prefix):].startswith(_PARTS):
      continue  # the LM, the GAN loss, ...
    path = torch_to_flax_path(key[len(prefix):])
    out[path] = torch_to_flax_array(path, np.asarray(x))
  return out


def expected_shapes(model, resolution: int) -> dict:
  """Flat {path: ShapeDtypeStruct} of `model`'s parameters."""
  x = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  return traverse_util.flatten_dict(nn.unbox(abstract)["params"])


def load_params(path: str, model, resolution: int, layout: str | None = None,
                encoder_only: bool = False) -> dict:
  """Reads a safetensors file into `model`'s parameter tree (float32 numpy leaves).

  `encoder_only` accepts checkpoints without decoder/post_quant_conv (the HF Chameleon model)
  and returns only encoder, quant_conv and quantize.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  flat = convert(load_file(path), layout)
  want = expected_shapes(model, resolution)
  if encoder_only:
    want = {p: s for p, s in want.items() if p[0] in ("encoder", "quant_conv", "quantize")}
    flat = {p: x for p, x in flat.items() if p[0] in ("encoder", "quant_conv", "quantize")}
  bad = [f"{'/'.join(p)}: missing in {path}" for p in want if p not in flat]
  bad += [f"{'/'.join(p)}: in {path} but not in the model" for p in flat if p not in want]
  bad += [f"{'/'.join(p)}: shape {flat[p].shape}, model expects {tuple(want[p].shape)}"
          for p in want.keys() & flat.keys() if flat[p].shape != tuple(want[p].shape)]
  if bad:
    raise ValueError(f"{path} does not fit the model ({len(bad)} problems):\n  " +
                     "\n  ".join(sorted(bad)))
  return traverse_util.unflatten_dict({p: x.astype(np.float32) for p, x in flat.items()})
