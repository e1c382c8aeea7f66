"""Entry points of every CLI: bad input ends in one line naming it, not a traceback.

  if __name__ == "__main__":
    cli.run(main)          # absl apps (--config flags): replaces app.run(main)
    cli.run_plain(main)    # argparse apps: main(argv=None)

A `ValueError` (our convention for bad input, e.g. `fileio.CorruptArtifactError`), a missing
file, a path that is a file where a folder is expected (a `--workdir` is checked up front), a
bad flag, or a misspelled `--config.` override prints one line `error: <message>` on stderr
and exits 2. Set `VLBPE_TRACEBACK=1` to get the full traceback instead.

Every absl CLI also keeps a persistent XLA compilation cache (`--jax_cache_dir`, by default
`<workdir>/jax_cache`): a killed run that resumes, or a stage re-run after a config change,
loads the programs it compiled before instead of compiling them again (jax keys each by its
HLO, compile options, backend and jax version, so a changed program is compiled anew).
"""

import os
import re
import sys

from absl import app
from absl import flags

EXIT_BAD_INPUT = 2
CACHE_SUBDIR = "jax_cache"
# Programs that compile faster than this are not worth a file (the demo's LM train step takes
# ~5 s, its generation widths ~1 s, the V2L's many small programs ~0.3 s each).
CACHE_MIN_COMPILE_S = 0.25
_INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                 IsADirectoryError)


def _fail(message: str):
  if os.environ.get("VLBPE_TRACEBACK") and sys.exc_info()[0] is not None:
    raise  # pylint: disable=misplaced-bare-raise  (re-raises the exception being handled)
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def _override_message(argv, e) -> str:
  """`--config.vq.totl_steps=3`: no such field; did you mean "total_steps"?"""
  text = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
  text = re.sub(r"\s+", " ", text)
  bad = [a for a in argv[1:] if a.startswith("--config.")]
  field = re.match(r"'?([^' ]+)'?", text)
  named = [a for a in bad if field and field.group(1) in a.split("=")[0]] or bad
  where = named[0].split("=")[0] if named else "a --config override"
  hint = re.search(r'Did you mean "([^"]+)"', text)
  return (f"{where}: no such config field" + (f"; did you mean {hint.group(1)!r}?" if hint
                                                 else f" ({text})"))


def _config_arg(argv) -> str:
  return next((a for a in argv[1:] if a.startswith("--config=")), "--config")


_JAX_CACHE_DIR = flags.DEFINE_string(
    "jax_cache_dir", "auto",
    "Persistent XLA compilation cache folder: 'auto' = <workdir>/jax_cache (none without "
    "--workdir; a cache the process already has, e.g. from JAX_COMPILATION_CACHE_DIR, is kept), "
    "'' = off, or a folder.")


def compilation_cache_dir(flag: str, workdir: str | None, current: str | None) -> str | None:
  """The cache folder a CLI uses: `flag` ('auto', '' or a folder), its `--workdir`, and the
  folder jax already has (`current`, None when unset). None = no cache."""
  if flag != "auto":
    return flag or None
  if current:
    return current
  return os.path.join(workdir, CACHE_SUBDIR) if workdir else None


def _use_compilation_cache():
  import jax  # pylint: disable=g-import-not-at-top  (argparse CLIs and `--help` need no jax)
  current = jax.config.values.get("jax_compilation_cache_dir")
  workdir = flags.FLAGS["workdir"].value if "workdir" in flags.FLAGS else None
  folder = compilation_cache_dir(_JAX_CACHE_DIR.value, workdir, current)
  if folder == current:
    return
  jax.config.update("jax_compilation_cache_dir", folder)
  if folder:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)


def _parse_flags(argv):
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS:  # config files load lazily: load now, report a bad path here
      getattr(flags.FLAGS.config, "to_dict")
  except flags.Error as e:  # a config file's own error comes with its traceback: keep the end
    text = f"{e}"
    if "Traceback" in text:
      text = text.split("\n")[0].rstrip(":") + ": " + text.strip().splitlines()[-1]
    _fail(text)
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown --config.<field>
    _fail(_override_message(argv, e))
  except OSError as e:  # config_flags: "Failed loading config file ...", then the OS error
    cause = f"{e}".strip().splitlines()[-1].strip()
    _fail(f"{_config_arg(argv)}: cannot load the config file ({cause})")
  except ValueError as e:  # a config file that rejects its argument
    _fail(f"{e}")
  workdir = flags.FLAGS["workdir"].value if "workdir" in flags.FLAGS else None
  if workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
    _fail(f"--workdir={workdir} is a file; expected a directory (new or from an earlier run)")
  return rest


def run(main):
  """`app.run(main)` with one-line errors for bad flags, configs and inputs."""
  def guarded(argv):
    _use_compilation_cache()
    try:
      return main(argv)
    except _INPUT_ERRORS as e:
      _fail(f"{e}")
  app.run(guarded, flags_parser=_parse_flags)


def run_plain(main):
  """Runs an argparse (or absl `FlagValues`) `main()` with one-line errors for bad inputs."""
  try:
    main()
  except _INPUT_ERRORS + (flags.Error,) as e:
    _fail(f"{e}")
