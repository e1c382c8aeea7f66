#!/usr/bin/env bash
# Local entry point (CPU or a single accelerator host).
#   bash launch/local.sh demo   # build data, tokenizers and models on the tiny config -> runs/demo/
#   bash launch/local.sh test   # the whole test suite on 8 fake CPU devices
# Creates .venv with the pinned dependencies on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
# Reinstall when setup.cfg changed since the last install.
if [ ! -f .venv/.installed ] || [ setup.cfg -nt .venv/.installed ]; then
  .venv/bin/pip install -q -e ".[test]"
  touch .venv/.installed
fi
cmd=${1:-}
shift || true
case "$cmd" in
  demo)
    .venv/bin/python -m vlbpe_jax.main --config=configs/tiny.py --workdir=runs/demo "$@"
    ;;
  test)
    XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8" \
      .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist worksteal --durations=15 \
      tests "$@"
    ;;
  *)
    echo "usage: bash launch/local.sh {demo|test} [extra args]" >&2
    exit 2
    ;;
esac
