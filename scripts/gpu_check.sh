#!/usr/bin/env bash
# The GPU check (issue 24; docs/gpu.md): install the project, then every CUDA measurement.
#
#   bash scripts/gpu_check.sh [--device cuda|cpu] [--budget-s S] [--no-install] [OUT]
#
# From the repository root of a CUDA machine without network: carried wheels (wheels/,
# made here by `make gpu-wheels`) are installed into /tmp/fmoe-site when their
# distribution is missing or older, the project with `pip install --no-deps -e .`
# (falling back to the source tree on PYTHONPATH if that fails), then scripts/gpu_check.py
# runs the stages within the budget (default 480 s) and writes results.json, summary.md
# and the rest under OUT ($OUT, else gpu_check_out).
# `--device cpu` is the dry run (smallest sizes; CI runs it); it installs nothing unless
# `--install` is given, so a development venv stays as it is.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
device=cuda
install=""
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; pass+=(--device "$2"); shift 2 ;;
    --device=*) device=${1#--device=}; pass+=("$1"); shift ;;
    --no-install) install=0; shift ;;
    --install) install=1; shift ;;
    *) pass+=("$1"); shift ;;
  esac
done
[ -z "$install" ] && { [ "$device" = cuda ] && install=1 || install=0; }

if [ "$install" = 1 ]; then
  if compgen -G "wheels/*.whl" >/dev/null; then
    mapfile -t need < <("$PY" scripts/gpu_wheels.py missing wheels)
    if [ ${#need[@]} -gt 0 ]; then
      echo "gpu_check.sh: installing carried wheels: ${need[*]##*/}"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fmoe-site "${need[@]}" || { echo "gpu_check.sh: wheel install failed"; exit 3; }
      export PYTHONPATH=/tmp/fmoe-site${PYTHONPATH:+:$PYTHONPATH}
    fi
  else
    echo "gpu_check.sh: no wheels/ folder: relying on installed packages"
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || echo "gpu_check.sh: pip install -e . failed; running from the source tree"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import simpy, pydantic, torch, transformers" \
  || { echo "gpu_check.sh: a dependency is missing (carry wheels/: docs/gpu.md)"; exit 3; }
exec "$PY" scripts/gpu_check.py "${pass[@]}"
