# The environment both GPU session scripts start from (sourced, not run): repository root, unbuffered output,
# llava_lib importable without installing, results under $OUT.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/llava_bench_out}"
mkdir -p "$OUT"
