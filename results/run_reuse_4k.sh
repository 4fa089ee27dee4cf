#!/usr/bin/env bash
# Reuse at 4x (issue 13): 4K prompts, budget 1024 (= prompt/4), SmolLM2 and Gemma-3-270M.
# The query-aware rows (full, snapkv, snapkv-k31 at 1024) and SmolLM2's context-only snapkv come
# from the earlier runs on the same prompts (results/smollm2-4k, results/gemma3-4k: same prompt
# hashes, identical predictions where both ran); results/reuse_4k_table.py pairs them. This script
# adds the reuse modes: probe (SmolLM2, Gemma), context-only (Gemma) and KVzip replay (SmolLM2; Gemma's
# sliding-window layers cannot be replayed). SmolLM2 goes on alone with the probe up to
# SMOLLM2_ROUNDS (its earlier query run has 14-15 prompts per task, Gemma's 10).
# Resumable and sample-major (defaults: what produced the records): round k brings each run to k samples per task, so a cut-off run
# stays balanced. The records in results/: ROUNDS=10 KVZIP_ROUNDS=3 SMOLLM2_ROUNDS=14, plus a first
# round that ran `--methods full,snapkv,snapkv-k31 --modes query,context,probe --samples 1` on SmolLM2
# (its 3 snapkv-k31 context-only records).
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
T="passkey,niah_single_1,niah_single_2"
E="python -m snapkv.eval.runner --tasks $T --threads 1 --no-progress --lengths 4k --budgets 1024"
for k in $(seq "${FROM:-1}" "${ROUNDS:-10}"); do
  $E --model smollm2 --samples "$k" --methods snapkv,snapkv-k31 --modes probe --out results/smollm2-4k-reuse
  $E --model gemma3-270m --prompt-format plain --samples "$k" --methods snapkv,snapkv-k31 --modes context,probe \
    --out results/gemma3-4k-reuse
  if [ "$k" -le "${KVZIP_ROUNDS:-3}" ]; then
    $E --model smollm2 --samples "$k" --methods kvzip,kvzip-k31 --modes context --out results/smollm2-4k-reuse
  fi
done
for k in $(seq $(( ${ROUNDS:-10} + 1 )) "${SMOLLM2_ROUNDS:-14}"); do
  $E --model smollm2 --samples "$k" --methods snapkv,snapkv-k31 --modes probe --out results/smollm2-4k-reuse
done
