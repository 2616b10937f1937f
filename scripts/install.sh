#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment and install QuerySeg into it.
#
#   VENV=.venv            where the environment lives (default: ./.venv)
#   QS_SKIP_D2=1          never install the Detectron2 snapshot (use the one already importable)
#   QS_BUILD_OPS=0        do not compile the C++ ops (the pure-PyTorch paths are used instead)
#   QS_EXPORT=0           do not install onnx/onnxruntime (the export extra; its tests skip)
#   QS_OPS_CUDA=0|1       compile the CUDA kernels too (default: only when a GPU is visible;
#                         the CPU kernels are always built unless QS_BUILD_OPS=0)
#
# Downloads go through pip's own cache (~/.cache/pip) and ~/.cache/queryseg, shared between clones;
# the environment itself is always private to the clone.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
CACHE=${QS_CACHE:-$HOME/.cache/queryseg}
STAMP="$VENV/.queryseg-installed"
HASH=$( (cat constraints.txt setup.cfg setup.py scripts/install.sh common/ops/csrc/*; \
  echo "${QS_BUILD_OPS:-1} ${QS_OPS_CUDA:-} ${QS_EXPORT:-1}") | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && "$VENV/bin/python" -c "import detectron2, torch, common" 2>/dev/null; then
  echo "[install] $VENV is up to date ($(cat "$STAMP"))"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=(pip_quiet "$VENV/bin/python" -m pip install --disable-pip-version-check -q -c constraints.txt)
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

echo "[install] torch, torchvision and the scientific stack"
"${PIP[@]}" "setuptools<81" wheel torch torchvision numpy scipy pycocotools opencv-python-headless \
  timm fvcore iopath pillow matplotlib tensorboard pytest pytest-timeout ruff shapely \
  termcolor yacs tabulate cloudpickle tqdm "omegaconf>=2.1,<2.4" "hydra-core>=1.1" packaging

# panopticapi-lite pins numpy<2 in its metadata but does not need it: install without deps.
"${PIP[@]}" --no-deps panopticapi-lite==0.2.0

# The `cityscapes` extra (setup.cfg), ~0.5 MB and needed by the Cityscapes tests: cityscapesscripts
# without its download/GUI dependencies (requests, appdirs, coloredlogs, the `typing` backport);
# loading and evaluating need only pyquaternion besides what is installed above.
"${PIP[@]}" --no-deps cityscapesscripts pyquaternion

if [ "${QS_SKIP_D2:-0}" != "1" ] && ! "$VENV/bin/python" -c "import detectron2.modeling" 2>/dev/null; then
  echo "[install] Detectron2 (registry snapshot, rebuilt without its foreign _C binary)"
  mkdir -p "$CACHE"
  WHEEL="$CACHE/detectron2-0.7.2-py3-none-any.whl"
  if [ ! -f "$WHEEL" ]; then
    TMP=$(mktemp -d)
    "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
      --platform any sal-detectron2==0.7.2 -d "$TMP"
    "$VENV/bin/python" scripts/rebuild_d2_wheel.py "$TMP"/sal_detectron2-0.7.2-*.whl "$WHEEL"
    rm -rf "$TMP"
  fi
  "${PIP[@]}" --no-deps "$WHEEL"
fi

# The `export` extra (ONNX export + onnxruntime CPU, ~40 MB of wheels): the export tests run in
# CI. QS_EXPORT=0 skips it (those tests then skip).
if [ "${QS_EXPORT:-1}" != "0" ]; then
  echo "[install] onnx and onnxruntime (the export extra)"
  "${PIP[@]}" onnx onnxruntime
fi

export QS_BUILD_OPS=${QS_BUILD_OPS:-1}
if [ -z "${QS_OPS_CUDA:-}" ]; then
  QS_OPS_CUDA=$("$VENV/bin/python" -c "import torch; print(int(torch.cuda.is_available()))")
fi
export QS_OPS_CUDA
echo "[install] QuerySeg (editable; C++ ops: build=$QS_BUILD_OPS cuda=$QS_OPS_CUDA)"
"${PIP[@]}" --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import detectron2, torch, common; print('[install] torch', torch.__version__, '| detectron2', detectron2.__version__)"
echo "$HASH" > "$STAMP"
