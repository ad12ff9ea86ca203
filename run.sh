#!/usr/bin/env bash
# centerx entry point. Sets itself up on first use (.venv, torch, the project), then:
#   bash run.sh [main] [overrides]   the main job on the built-in synthetic data
#   bash run.sh SUBCOMMAND [hydra overrides]   train, distill, eval, predict, export, pseudo_label
#   bash run.sh test [pytest args]   the test suite
#   bash run.sh bench [args]         training throughput benchmark (scripts/benchmark_train.py)
# Environment:
#   CENTERX_TORCH_SPEC  torch requirement to install (default torch==2.13.0, the CPU wheel;
#                       a loose spec such as "torch" pulls gigabytes of CUDA packages)
#   CENTERX_PYTHON      interpreter used to create .venv (default python3)
#   NPROC               processes per node: >1 launches torchrun (DDP)
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="$VENV/bin/python"
TORCH_SPEC="${CENTERX_TORCH_SPEC:-torch==2.13.0}"

bootstrap() {
  if [ ! -x "$PY" ]; then
    echo "[run.sh] creating $VENV" >&2
    "${CENTERX_PYTHON:-python3}" -m venv "$VENV"
  fi
  local stamp="$VENV/.centerx-installed" want
  want="$(cat pyproject.toml; echo "$TORCH_SPEC")"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  echo "[run.sh] installing $TORCH_SPEC and centerx (editable, with dev tools)" >&2
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet "$TORCH_SPEC"
  "$PY" -m pip install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
}

has_run_dir() {
  for arg in "$@"; do case "$arg" in hydra.run.dir=*) return 0 ;; esac; done
  return 1
}

bootstrap

command="${1:-main}"
case "$command" in
  test)
    shift
    exec "$PY" -m pytest "$@"
    ;;
  bench)
    shift
    exec "$PY" scripts/benchmark_train.py "$@"
    ;;
  *=*)
    command=main  # overrides only: the main job
    ;;
  *)
    # A subcommand: centerx checks it against its one list (SUBCOMMANDS in centerx/cli.py).
    [ $# -gt 0 ] && shift
    ;;
esac

# Fix the run directory once here: under torchrun every rank would resolve ${now:} itself.
if ! has_run_dir "$@"; then
  set -- "$@" "hydra.run.dir=outputs/$command/$(date +%Y-%m-%d_%H-%M-%S)"
fi

if [ "${NPROC:-1}" -gt 1 ]; then
  exec "$PY" -m centerx.launch "$NPROC" "$command" "$@"  # torchrun, failures as one line
fi
exec "$PY" -m centerx "$command" "$@"
