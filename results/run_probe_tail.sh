#!/usr/bin/env bash
# The probe with the context's last window (Probe(), mode `probe`) against the probe alone
# (Probe(tail=0), mode `probe-only`, what results/*-4k-reuse measured as `probe`), on the same
# 4K prompts, budget 1024 (4x), one context+probe prefill per prompt serving both modes.
# Full-cache and query-aware rows come from results/smollm2-4k and results/gemma3-4k (same prompt
# hashes); results/reuse_4k_table.py pairs them. Round k brings each model to k samples per task.
# GEMMA_ONLY=1 runs Gemma's rounds alone. Resumable: rerun to continue.
set -u
cd "$(dirname "$0")/.."
T="passkey,niah_single_1,niah_single_2"
E="python -m snapkv.eval.runner --tasks $T --threads ${THREADS:-1} --no-progress --lengths 4k --budgets 1024"
for k in $(seq "${FROM:-1}" "${ROUNDS:-14}"); do
  [ "${GEMMA_ONLY:-0}" = 1 ] || $E --model smollm2 --samples "$k" --methods snapkv,snapkv-k31 --modes probe,probe-only \
    --out results/smollm2-4k-probe-tail
  if [ "$k" -le "${GEMMA_ROUNDS:-10}" ]; then
    $E --model gemma3-270m --prompt-format plain --samples "$k" --methods snapkv,snapkv-k31 --modes probe,probe-only \
      --out results/gemma3-4k-probe-tail
  fi
done
