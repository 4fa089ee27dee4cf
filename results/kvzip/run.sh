#!/usr/bin/env bash
# KVzip (reuse mode) against SnapKV's modes on SmolLM2 at 2K (resumable: rerun to continue).
set -u
cd "$(dirname "$0")/../.."
OMP_NUM_THREADS=1 python -m snapkv.eval.runner --model smollm2 --tasks passkey,niah_single_1,niah_single_2 \
  --samples "${SAMPLES:-10}" --threads 1 --no-progress --lengths 2k --budgets 256,512 \
  --methods full,snapkv,snapkv-k31,kvzip --modes query,context,probe --out results/kvzip
