#!/usr/bin/env bash
# One GPU session: the card, the decode benchmark, the Stage 1 and Stage 2 training-step benchmarks, a summary last.
#
# For the lead (device tool), from the repository root, nothing to carry:
#     run(command="bash benchmarks/gpu_session.sh", timeout_s=540)
# The benchmarks need no tokenizer there (the chat template's token ids are written out in benchmarks/common.py and
# checked against the real tokenizer by tests/test_benchmarks.py), and import nothing the machine lacks
# (modelscope, dashscope, llava_lib.data). Expected wall time: about 5-6 minutes (generate with the compilation
# of its static-cache path: not measured yet, limited to 150 s; train_step at most about 4.5 minutes, of which one
# to two minutes of torch.compile; stage2_step at most 120 s); hard limits below keep the whole script under 10
# minutes (the device tool's limit per command). Results come back under $OUT: generate.json, train_step.json,
# stage2_step.json, their logs and summary.txt. Exit status: 0 when every check passed (train_step and stage2_step:
# same loss; generate: every path ran and decoded the asked number of tokens). The decode benchmark alone:
# benchmarks/gpu_generate_only.sh.
source "$(dirname "$0")/gpu_env.sh"

echo "== card"
nvidia-smi -L || true
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv || true
python3 - <<'EOF'
import sys, torch, transformers
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) | transformers {transformers.__version__}")
print("torch.cuda.get_device_name:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
EOF

echo "== generate (batch 1, 128 new tokens)"
timeout 150 python3 benchmarks/generate.py --json "$OUT/generate.json" 2>&1 | tee "$OUT/generate.log"
gen_rc=${PIPESTATUS[0]}

echo "== train_step (textbook vs train())"
timeout 300 python3 benchmarks/train_step.py --budget-s 255 --json "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.log"
ts_rc=${PIPESTATUS[0]}

echo "== stage2_step (the original course's Stage 2 recipe vs train(stage=2), batch 4/8/16)"
timeout 120 python3 benchmarks/stage2_step.py --json "$OUT/stage2_step.json" 2>&1 | tee "$OUT/stage2_step.log"
s2_rc=${PIPESTATUS[0]}

echo "== summary (exit codes: generate $gen_rc, train_step $ts_rc, stage2_step $s2_rc; 124 = killed at its time limit)"
python3 benchmarks/common.py summary "$OUT/train_step.json" "$OUT/generate.json" | tee "$OUT/summary.txt"
[ "$gen_rc" -eq 0 ] && [ "$ts_rc" -eq 0 ] && [ "$s2_rc" -eq 0 ]
