#!/usr/bin/env bash
# Gemma-3-270M (base model: plain prompts) runs behind docs/RESULTS.md (resumable).
set -u
cd "$(dirname "$0")/.."
E="python -m snapkv.eval.runner --model gemma3-270m --prompt-format plain --tasks passkey,niah_single_1,niah_single_2 --samples ${SAMPLES:-10} --threads 1 --no-progress"
case "${1:-4k}" in
  4k) $E --lengths 4k --budgets 64,256,1024,2048 --methods full,snapkv,streaming --modes query --out results/gemma3-4k ;;
  4k-k31) $E --lengths 4k --budgets 64,256,1024,2048 --methods full,snapkv-k31 --modes query --out results/gemma3-4k ;;
  4k-adakv) $E --lengths 4k --budgets 64,256,1024,2048 --methods full,snapkv,adakv --modes query --out results/gemma3-4k ;;
  8k) $E --lengths 8k --budgets 64,256,1024,2048 --methods full,snapkv,adakv,streaming --modes query --out results/gemma3-8k ;;
  8k-k31) $E --lengths 8k --budgets 64,256,1024,2048 --methods full,snapkv-k31 --modes query --out results/gemma3-8k ;;
  16k) $E --lengths 16k --budgets 64,256,1024,2048 --methods full,snapkv,snapkv-k31,adakv,streaming --modes query --out results/gemma3-16k ;;
esac
