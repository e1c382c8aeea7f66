"""Helpers for `configs/*.py` files (the only package module configs import).

`parse_arg` turns the string after the colon of `--config=configs/tiny.py:ARG` into a
ConfigDict of named options, the way big_vision's `bvcc.parse_arg` does:

  parse_arg("tiny", variant="B", tiny=False)            -> variant="B", tiny=True
  parse_arg("variant=S,tiny", variant="B", tiny=False)  -> variant="S", tiny=True
  parse_arg(None, variant="B", tiny=False)              -> the defaults

A bare word sets a boolean option to True; `key=value` is cast to the default's type.
"""

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
