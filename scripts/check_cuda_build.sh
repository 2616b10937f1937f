#!/usr/bin/env bash
# CI check: compile and link QuerySeg's CUDA ops (common/ops/csrc) with nvcc, then import the
# module. Running the kernels needs a GPU; this only proves that the sources build against the
# installed PyTorch. Skips (exit 0) when no CUDA toolkit is found.
#
#   PYTHON=.venv/bin/python            interpreter with torch (default: .venv/bin/python, python3)
#   QS_CHECK_CUDA_ARCH="9.0"           architectures to compile for (one keeps it to ~2-3 min)
#   MAX_JOBS=2                         parallel compiler jobs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export TORCH_CUDA_ARCH_LIST=${QS_CHECK_CUDA_ARCH:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}

if ! CUDA_FOUND=$("$PY" -c 'from common.ops.build import cuda_home; print(cuda_home() or "")'); then
  echo "[check_cuda_build] FAIL: cannot run common.ops.build with $PY" >&2
  exit 1
fi
CUDA_FOUND=$(printf '%s\n' "$CUDA_FOUND" | tail -n 1)
if [ -z "$CUDA_FOUND" ]; then
  echo "[check_cuda_build] SKIP: no CUDA toolkit (nvcc + headers) found, or torch is a CPU build"
  exit 0
fi
export CUDA_HOME="$CUDA_FOUND"

BUILD_DIR=$(mktemp -d "${TMPDIR:-/tmp}/qs_cuda_build.XXXXXX")
trap 'rm -rf "$BUILD_DIR"' EXIT
START=$(date +%s)
echo "[check_cuda_build] compiling for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST in $BUILD_DIR"
QS_BUILD_DIR="$BUILD_DIR" "$PY" - <<'PY'
import os

from common.ops.build import cuda_home, load

print(f"[check_cuda_build] CUDA toolkit: {cuda_home()}")
ext = load(with_cuda=True, build_directory=os.environ["QS_BUILD_DIR"], verbose=True)
assert ext.with_cuda(), "the extension was built without its CUDA kernels"
for name in ("ms_deform_attn_forward", "ms_deform_attn_backward"):
    assert hasattr(ext, name), name
print(f"[check_cuda_build] linked and imported {ext.__file__}")
PY
echo "[check_cuda_build] OK in $(( $(date +%s) - START )) s"
