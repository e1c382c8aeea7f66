"""Helpers for `configs/*.py` files (the only package module configs import).

`parse_arg` turns the string after the colon of `--config=configs/tiny.py:ARG` into a
ConfigDict of named options, the way big_vision's `bvcc.parse_arg` does:

  parse_arg("tiny", variant="B", tiny=False)            -> variant="B", tiny=True
  parse_arg("variant=S,tiny", variant="B", tiny=False)  -> variant="S", tiny=True
  parse_arg(None, variant="B", tiny=False)              -> the defaults

A bare word sets a boolean option to True; `key=value` is cast to the default's type.
"""

import os

import ml_collections


def _cast(key, value, default):
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes"):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"config arg {key}={value!r}: expected a boolean (true/false)")
  if default is None:
    return value
  try:
    return type(default)(value)
  except ValueError as e:
    raise ValueError(
        f"config arg {key}={value!r}: expected a {type(default).__name__}") from e


def parse_arg(arg, **defaults):
  """Parses `"a=1,b,c=x"` against `defaults`; unknown keys raise ValueError."""
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in str(arg).split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} unknown; expected one of {sorted(defaults)}")
    if not sep:
      if not isinstance(defaults[key], bool):
        raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
      out[key] = True
    else:
      out[key] = _cast(key, value, defaults[key])
  return out


# Hardware a real-size config targets (`config.target`): accelerator, chips (= jax devices),
# HBM per chip in GiB, and the platform its step is lowered for (vlbpe_jax/aot.py). A v5p-N
# slice has N TensorCores, 2 per chip; a v6e-N slice has N chips.
TARGETS = {
    "v5p-64": dict(chip="TPU v5p", devices=32, hbm_gib=95, platform="tpu"),
    "v6e-64": dict(chip="TPU v6e", devices=64, hbm_gib=32, platform="tpu"),
    "h100x8": dict(chip="H100 SXM", devices=8, hbm_gib=80, platform="cuda"),
    "cpu": dict(chip="CPU", devices=8, hbm_gib=0, platform="cpu"),  # the :tiny variants
}


def target(name: str) -> dict:
  """`TARGETS[name]` as a plain dict (a config's `target` field); unknown names raise."""
  if name not in TARGETS:
    raise ValueError(f"config arg target={name!r} unknown; expected one of {sorted(TARGETS)}")
  return dict(TARGETS[name], name=name)


def beingvl_lm_config(arg, *, variant: str, targets: dict):
  """The Being-VL real-size config (configs/beingvl_8b.py, beingvl_1b.py): the unified LM at
  `variant` size on `targets[arg.target]` (mesh, global batch, attention kernel); `arg` from
  `parse_arg(arg, target=..., remat=..., scan=..., attention=..., tiny=...)`."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  tiny = arg.tiny
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "lm"  # the stage this file sizes (its data comes from the tiny pipeline's stages)
  c.target = target("cpu" if tiny else arg.target)  # chip, devices, HBM
  t = targets[c.target.name]
  c.mesh = t["mesh"]
  c.lm = dict(
      variant="mu" if tiny else variant,  # vlbpe_jax/lm/config.py:VARIANTS
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


def distributed_requested() -> bool:
  """Whether `VLBPE_DISTRIBUTED` asks for a multi-process run ("1"; "" or "0": one process).

  Read without jax, so that numpy-only CLIs (the visual BPE learner) import jax only when it
  is set; `parallel.initialize_distributed` joins the run."""
  flag = os.environ.get("VLBPE_DISTRIBUTED", "")
  if flag not in ("", "0", "1"):
    raise ValueError(f"VLBPE_DISTRIBUTED={flag!r}: expected 1 (multi-process) or 0/unset")
  return flag == "1"
