#!/usr/bin/env bash
# The GPU suite in one device call: environment, kernel and engine checks, GPU tests, the sweep.
#
#   set -o pipefail; PYTHONUNBUFFERED=1 bash scripts/gpu_suite.sh 2>&1 | tee $OUT/log.txt
#
# Writes under $OUT (default runs/gpu-suite): checks.json, pytest.txt, bench/bench.{json,md,png}.
# STAGES picks stages (default "env checks tests sweep"); SWEEP_ARGS replaces the sweep's options
# (default: part 1 of the gpu preset: batch 1 up to 128K and 8 x 128K, with both baselines);
# SWEEP_BUDGET_S stops starting new sweep points after that many seconds. One device command may run
# 10 minutes and the whole preset takes about 11, so the rest (256K to 1M, other budgets, batches
# 2-8 at 16K, ablations) runs as a second call of this script:
#   STAGES="env sweep" SWEEP_ARGS="--preset gpu --part 2" SWEEP_BUDGET_S=480 bash scripts/gpu_suite.sh
# and `python -m snapkv.bench.runner --merge part1/bench.json part2/bench.json --out DIR` joins them.
# The documented API (answer(), ContextCache.ask(), backend auto and transformers) against the engine,
# Llama-3-8B shape, random bf16 weights, 32K and 128K (its own call, about 5 minutes):
#   STAGES="env api" bash scripts/gpu_suite.sh      -> $OUT/api/api_bench.{json,md}
# Gemma 3 (4B text shape, random weights) on the engine's own-layer path vs transformers (its own call):
#   STAGES="env gemma" bash scripts/gpu_suite.sh       -> $OUT/gemma/gemma.{json,md}
#     (GEMMA_ARGS="--lengths 32768 --attn-bench --profile": one length, the sliding attention timed, a profile)
#   STAGES="env gemma_compile" bash scripts/gpu_suite.sh   (the decode step compiled; its own call)
# The server (scripts/bench_serve.py; serve32 about 5 minutes, serve128 about 4) and the decode step's kernels:
#   STAGES="env capture profile serve32 servefill32" bash scripts/gpu_suite.sh -> $OUT/{capture.txt,profile,serve}
#   STAGES="env serve128" bash scripts/gpu_suite.sh
# Head-adaptive budgets (ragged cache; about 4 minutes, its own call):
#   STAGES="env ragged" bash scripts/gpu_suite.sh      -> $OUT/ragged/{layer,engine,hf_model}.json
# KVzip replay scoring (Triton replay kernel) vs SnapKV's prefill, Llama-3-8B shape, 32K and 128K, with the
# kernel's GPU tests (about 4 minutes, its own call): span-limited replay (KVZIP_SPAN, default 2048) at both
# lengths, exact replay up to KVZIP_EXACT_MAX tokens (default 32768; 131072 adds the ~60 s exact 128K point):
#   STAGES="env kvzip" bash scripts/gpu_suite.sh       -> $OUT/kvzip/{kvzip.json,pytest.txt}
# Head-adaptive budgets selected in the engine's prefill vs uniform SnapKV, captured decode, Llama-3-8B
# shape, 32K and 128K, budget 2048 (under 2 minutes; may share a call with another short stage):
#   STAGES="env adaptive_engine" bash scripts/gpu_suite.sh   -> $OUT/adaptive_engine.json
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu-suite}"
mkdir -p "$OUT/bench"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
STAGES="${STAGES:-env checks tests sweep}"
SWEEP_ARGS="${SWEEP_ARGS:---preset gpu --part 1}"
SWEEP_BUDGET_S="${SWEEP_BUDGET_S:-300}"
status=0
t0=$(date +%s)
stage() { echo; echo "=== $1 ($(($(date +%s) - t0)) s) ==="; }

if [[ " $STAGES " == *" env "* ]]; then
  stage env
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
  "$PY" - <<'PY'
import torch, transformers, triton, sys
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| triton", triton.__version__)
p = torch.cuda.get_device_properties(0)
print(p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs",
      "| cudnn", torch.backends.cudnn.version(), "| flash sdp", torch.backends.cuda.flash_sdp_enabled(),
      "| cudnn sdp", torch.backends.cuda.cudnn_sdp_enabled())
PY
fi

if [[ " $STAGES " == *" checks "* ]]; then
  stage "kernel and engine checks"
  timeout 300 "$PY" -m snapkv.bench.checks --json "$OUT/checks.json" || status=1
fi

if [[ " $STAGES " == *" tests "* ]]; then
  stage "pytest -m gpu, and the engine's own tests"
  # test_serve.py has no GPU tests, and its HTTP client (openai) needs wheels the GPU machine lacks.
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu --ignore=tests/test_serve.py tests 2>&1 \
    | tee "$OUT/pytest.txt" || status=1
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_generation.py tests/test_bench.py \
    2>&1 | tail -3 | tee -a "$OUT/pytest.txt" || status=1
fi

if [[ " $STAGES " == *" ragged "* ]]; then
  stage "ragged: kernel per layer, engine decode uniform vs skewed heads, transformers path"
  mkdir -p "$OUT/ragged"
  timeout 200 "$PY" scripts/bench_ragged.py --out "$OUT/ragged/layer.json" || status=1
  timeout 150 "$PY" scripts/bench_ragged.py --skip-layer --engine-budgets 1024 2048 4096 --engine-batch 1 8 \
    --out "$OUT/ragged/engine.json" || status=1
  timeout 300 "$PY" scripts/bench_ragged.py --skip-layer --model-prompts 8192 32768 65536 --model-budgets 1024 2048 \
    --model-new-tokens 128 --out "$OUT/ragged/hf_model.json" || status=1
fi

if [[ " $STAGES " == *" adaptive_engine "* ]]; then
  stage "adaptive_engine: engine prefill + captured decode, AdaptiveHeads vs uniform, llama3-8b shape, 32K/128K"
  timeout 240 "$PY" scripts/bench_engine_adaptive.py --prompts 32768 131072 --budget 2048 \
    --out "$OUT/adaptive_engine.json" || status=1
fi

if [[ " $STAGES " == *" api "* ]]; then
  stage "api: answer()/ContextCache (auto, transformers) vs the engine, llama3-8b shape, 32K and 128K"
  mkdir -p "$OUT/api"
  timeout "${API_TIMEOUT_S:-540}" "$PY" -m snapkv.bench.api_bench --model llama3-8b --lengths "${API_LENGTHS:-32K,128K}" --budget 2048 \
    ${API_ROWS:+--rows "$API_ROWS"} \
    --new-tokens 64 --time-budget "${API_BUDGET_S:-420}" --out "$OUT/api" || status=1
fi

if [[ " $STAGES " == *" gemma "* ]]; then
  stage "gemma: Gemma-3-4B shape on the engine (own layers) vs the transformers path, 32K and 128K"
  timeout 560 "$PY" scripts/bench_gemma.py ${GEMMA_ARGS:-} --out "$OUT/gemma" || status=1
fi

if [[ " $STAGES " == *" gemma_compile "* ]]; then
  stage "gemma_compile: the same shape, decode step through torch.compile then captured (opt-in compile_decode)"
  timeout 560 "$PY" scripts/bench_gemma.py --modes engine+compile --no-check --out "$OUT/gemma_compile" || status=1
fi

if [[ " $STAGES " == *" capture "* ]]; then
  stage "capture: decode graphs vs other graphs' destruction and other threads' streams"
  timeout 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_decode_capture.py 2>&1 | tail -3 \
    | tee "$OUT/capture.txt" || status=1
fi

if [[ " $STAGES " == *" profile "* ]]; then
  stage "profile: kernels of one captured decode step, llama3-8b shape, budget 2048"
  timeout 200 "$PY" scripts/profile_decode.py --out "$OUT/profile/decode.json" || status=1
fi

if [[ " $STAGES " == *" serve32 "* ]]; then
  stage "serve32: 16 x 32K distinct documents arriving at once, SnapKV vs full cache"
  timeout 330 "$PY" scripts/bench_serve.py --model llama3-8b --device cuda --lengths 32768 --fill-from-document \
    --counts 16 --full-counts 16 --max-tokens 8192 --steady-steps 64 --time-budget-s 280 \
    --out "$OUT/serve/distinct32k" || status=1
fi

if [[ " $STAGES " == *" servefill32 "* ]]; then
  stage "servefill32: 16 x 32K filled from one document, SnapKV vs full: both decode phases start together"
  timeout 240 "$PY" scripts/bench_serve.py --model llama3-8b --device cuda --lengths 32768 \
    --fill-from-document 32768 --fill-counts 16 --full-fill --fill-max-tokens 3072 --steady-steps 128 \
    --time-budget-s 200 --out "$OUT/serve/fill32k" || status=1
fi

if [[ " $STAGES " == *" servesweep32 "* ]]; then
  stage "servesweep32: N = 1, 8, 32, 64 rows of 32K filled from one document, SnapKV vs full at the same N"
  timeout 280 "$PY" scripts/bench_serve.py --model llama3-8b --device cuda --lengths 32768 \
    --fill-from-document 32768 --fill-counts 1 8 32 64 --full-fill --fill-max-tokens 3072 --steady-steps 64 \
    --time-budget-s 240 --out "$OUT/serve/sweep32k" || status=1
fi

if [[ " $STAGES " == *" serve128 "* ]]; then
  stage "serve128: 128K documents: how many rows decode at once (filled from one document), full cache beside"
  timeout 300 "$PY" scripts/bench_serve.py --model llama3-8b --device cuda --lengths 131072 \
    --fill-from-document 131072 --fill-counts 32 64 --fill-max-tokens 2048 --full-counts 1 --steady-steps 64 \
    --time-budget-s 260 \
    --out "$OUT/serve/fill128k" || status=1
fi

if [[ " $STAGES " == *" kvzip "* ]]; then
  stage "kvzip: replay kernel GPU tests, then KVzip exact and span-limited (prefill + replay + selection) vs SnapKV"
  mkdir -p "$OUT/kvzip"
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_replay_kernel.py 2>&1 | tail -5 \
    | tee "$OUT/kvzip/pytest.txt" || status=1
  timeout 280 "$PY" scripts/bench_kvzip.py --model llama3-8b --device cuda --lengths 32768,131072 \
    --span "${KVZIP_SPAN:-2048}" --exact-max-tokens "${KVZIP_EXACT_MAX:-32768}" \
    --budget-s 230 --out "$OUT/kvzip/kvzip.json" || status=1
fi

if [[ " $STAGES " == *" sweep "* ]]; then
  stage sweep
  # shellcheck disable=SC2086
  "$PY" -m snapkv.bench.runner $SWEEP_ARGS --time-budget "$SWEEP_BUDGET_S" --out "$OUT/bench" || status=1
fi

stage "done, status $status"
exit $status
