#!/usr/bin/env bash
# More Gemma-3-270M reuse prompts at 4K (seed 1: prompts other than seed 0's 30): the full cache and
# query-aware kernel 31 as the reference, the probe (Probe()) and the probe alone, budget 1024 (4x).
# Round k brings every task to k samples. Resumable.
set -u
cd "$(dirname "$0")/.."
for k in $(seq "${FROM:-1}" "${ROUNDS:-10}"); do
  python -m snapkv.eval.runner --model gemma3-270m --prompt-format plain --tasks passkey,niah_single_1,niah_single_2 \
    --seed 1 --threads "${THREADS:-1}" --no-progress --lengths 4k --budgets 1024 --samples "$k" \
    --methods full,snapkv-k31 --modes query,probe,probe-only --out results/gemma3-4k-probe-tail-s1
done
