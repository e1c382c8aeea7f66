# Shared by launch/tpu.sh and launch/gpu.sh (sourced; DRY_RUN is the caller's --dry-run flag).
# shellcheck shell=bash

q() {  # its arguments as one shell line; single quotes around what is not plainly safe
  local out=() a key sq="'" esc="'\\''"
  for a in "$@"; do
    key=""
    [[ $a =~ ^--[A-Za-z0-9_.-]+= ]] && key=${BASH_REMATCH[0]} a=${a#"$key"}  # --flag='value'
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$key$a"); else
      out+=("$key'${a//$sq/$esc}'"); fi
  done
  printf '%s\n' "${out[*]}"
}

run() {  # runs a command; with --dry-run prints it instead
  if ((${DRY_RUN:-0})); then q "$@"; else echo "+ $(q "$@")" >&2; "$@"; fi
}
