#!/usr/bin/env bash
# SmolLM2 runs behind docs/RESULTS.md (resumable: rerun the same line to continue).
set -u
cd "$(dirname "$0")/.."
E="python -m snapkv.eval.runner --model smollm2 --tasks ${TASKS:-passkey,niah_single_1,niah_single_2} --samples ${SAMPLES:-10} --threads 1 --no-progress"
case "${1:-2k}" in
  2k) $E --lengths 2k --budgets 64,128,256,1024 --methods full,snapkv,pyramidkv,streaming,random,h2o \
         --modes query,context,probe --out results/smollm2-2k ;;
  4k) $E --lengths 4k --budgets 64,256,1024,2048 --methods full,snapkv,streaming \
         --modes query,context --out results/smollm2-4k ;;
  # AdaKV (head-adaptive budgets) against uniform SnapKV on the same 4K prompts.
  4k-adakv) $E --lengths 4k --budgets 64,256,1024,2048 --methods full,snapkv,adakv --modes query \
         --out results/smollm2-4k ;;
  # The wider pooling kernel (chosen on niah_single_2, results/ablation) on every 4K prompt.
  4k-k31) $E --lengths 4k --budgets 64,256,1024,2048 --methods full,snapkv-k31 --modes query \
         --out results/smollm2-4k ;;
  8k) $E --lengths 8k --budgets 64,256,1024,2048 --methods full,snapkv,snapkv-k31,adakv,pyramidkv,streaming \
         --modes query,context --out results/smollm2-8k ;;
  # The other RULER tasks at 2K (decode caps up to 120 tokens: fewer methods).
  2k-ruler) $E --lengths 2k --budgets 64,128,256,1024 --methods full,snapkv,snapkv-k31 --modes query \
         --out results/smollm2-2k-ruler ;;
esac
