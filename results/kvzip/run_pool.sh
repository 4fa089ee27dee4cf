#!/usr/bin/env bash
# KVzip scores with and without max pooling (kernel 31) on niah_single_2 (one replay serves both).
set -u
cd "$(dirname "$0")/../.."
OMP_NUM_THREADS=1 python -m snapkv.eval.runner --model smollm2 --tasks niah_single_2 \
  --samples "${SAMPLES:-10}" --threads 1 --no-progress --lengths 2k --budgets 256,512 \
  --methods kvzip,kvzip-k31 --modes context --out results/kvzip/pool
