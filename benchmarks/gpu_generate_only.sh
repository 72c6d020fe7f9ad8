#!/usr/bin/env bash
# The decode benchmark alone, for a second, short GPU session (issue 7): the first session (2026-11-26, H200) had
# the FastDecoder at 4.45x transformers with its bit-identity check failed; this reruns only generate.py, with the
# static-graph decoder, the fp32 token-identity check and the diagnostics (docs/perf_notes.md, Change 7).
#
# For the lead (device tool), from the repository root, nothing to carry:
#     run(command="bash benchmarks/gpu_generate_only.sh", timeout_s=180)
# Same conventions as gpu_session.sh: no tokenizer, no modelscope/dashscope on the GPU machine; results under $OUT
# (generate.json, generate.log, summary.txt). Expected wall time: 70-100 s including imports (generate.py stops
# starting diagnostics at --budget-s; the hard limit below is 140 s). Exit status: generate.py's (0 = checks passed).
source "$(dirname "$0")/gpu_env.sh"

echo "== card"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv || true

echo "== generate (batch 1, 128 new tokens)"
timeout 140 python3 benchmarks/generate.py --budget-s 95 --json "$OUT/generate.json" 2>&1 | tee "$OUT/generate.log"
gen_rc=${PIPESTATUS[0]}

echo "== summary (exit code: generate $gen_rc; 124 = killed at its time limit)"
python3 benchmarks/common.py summary "" "$OUT/generate.json" | tee "$OUT/summary.txt"
exit "$gen_rc"
