#!/usr/bin/env bash
# Reuse at 4x (issue 13): 4K prompts, budget 1024 (= prompt/4), SmolLM2 and Gemma-3-270M, the
# query-aware reference (query), context-only (context) and the generic probe (probe).
# Resumable and sample-major: round k brings both models to k samples per task, so a cut-off run
# stays balanced. Usage: ROUNDS=12 bash results/run_reuse_4k.sh   (METHODS overrides the method list)
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
M="${METHODS:-full,snapkv,snapkv-k31}"
T="passkey,niah_single_1,niah_single_2"
for k in $(seq "${FROM:-1}" "${ROUNDS:-12}"); do
  python -m snapkv.eval.runner --model smollm2 --tasks $T --samples "$k" --threads 1 --no-progress \
    --lengths 4k --budgets 1024 --methods "$M" --modes query,context,probe --out results/smollm2-4k-reuse
  python -m snapkv.eval.runner --model gemma3-270m --prompt-format plain --tasks $T --samples "$k" --threads 1 \
    --no-progress --lengths 4k --budgets 1024 --methods "$M" --modes query,context,probe --out results/gemma3-4k-reuse
done
