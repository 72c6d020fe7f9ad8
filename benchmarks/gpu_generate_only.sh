#!/usr/bin/env bash
# The decode benchmark alone, for a short GPU session: transformers' generate with its dynamic cache, with its static
# cache compiled (CUDA graphs), and the project's chat path (benchmarks/generate.py).
#
# For the lead (device tool), from the repository root, nothing to carry:
#     run(command="bash benchmarks/gpu_generate_only.sh", timeout_s=180)
# Same conventions as gpu_session.sh: no tokenizer, no modelscope/dashscope on the GPU machine; results under $OUT
# (generate.json, generate.log, summary.txt). Expected wall time: about a minute including imports and the
# compilation (not measured yet; the hard limit below is 140 s). Exit status: generate.py's (0 = checks passed).
source "$(dirname "$0")/gpu_env.sh"

echo "== card"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv || true

echo "== generate (batch 1, 128 new tokens)"
timeout 140 python3 benchmarks/generate.py --json "$OUT/generate.json" 2>&1 | tee "$OUT/generate.log"
gen_rc=${PIPESTATUS[0]}

echo "== summary (exit code: generate $gen_rc; 124 = killed at its time limit)"
python3 benchmarks/common.py summary "" "$OUT/generate.json" | tee "$OUT/summary.txt"
exit "$gen_rc"
