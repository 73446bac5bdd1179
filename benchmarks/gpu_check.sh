#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py), with the exact commands for the H200 machine. From the repo root:
#
#   bash benchmarks/gpu_check.sh wheels    # HERE, with a network: missing packages as wheels into .whl/
#   bash benchmarks/gpu_check.sh           # THERE, via the device tool: carry [".whl"], timeout_s 600;
#                                          # writes gpu_check.json, gpu_check.md, gpu_check.log, env.txt to $OUT
#
# That machine has Python 3.12, jax (CUDA), flax, optax, orbax-checkpoint, timm and torch, but no network and
# no grain, ftfy or open_clip. The check imports none of these; the wheels (ftfy and its dependency) only make
# the rest of pe_jax importable there. Extra arguments go to gpu_check.py (e.g. --sections inference), or in
# `wheels` mode name more packages to download.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = wheels ]; then
  shift
  mkdir -p .whl  # git-ignored
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl ftfy wcwidth "$@" || exit
  ls -l .whl
  exit
fi

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
# pe-jax itself: no dependencies (they are there or not needed), no build isolation (no index to fetch setuptools)
if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
  echo "pip install -e . failed: importing pe_jax from the checkout instead"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# the carried wheels, into a folder of their own on PYTHONPATH
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi
  "$PY" -m pip list 2> /dev/null | grep -iE '^(jax|jaxlib|jax-cuda13-plugin|jax-cuda13-pjrt|flax|optax|orbax-checkpoint|timm|torch|numpy|nvidia-cudnn-cu13|nvidia-cublas|pe-jax) '
} > "$OUT/env.txt" 2>&1
# The sections share 465 s (gpu_check.py's default); the hard stop stays under 9 minutes. On SIGTERM the script
# ends its running section and still writes the JSON and the table.
PYTHONUNBUFFERED=1 timeout -k 15 525 "$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
