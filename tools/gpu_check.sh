#!/usr/bin/env bash
# The GPU check (`make gpu-check`). In the order of what matters most, so that a run cut short keeps it:
# tools/benchmark.py at 800 px (the paper's setting) with 2 images per step, in float32 and under
# bfloat16 autocast; the layer tests with the Triton kernels compiled on CUDA (full-size shapes
# included) and a CUDA training step through both code paths; tools/benchmark_layers.py (one BCN
# layer against one GroupNorm, alone, with a ReLU after and as a block's end with a shortcut added
# before the ReLU, host and wall time per call: Triton kernels launched directly, with the torch
# profiler's table of both layers, through Triton's launcher (WSBCN_TRITON_DIRECT=0), and the torch
# code); tools/benchmark.py at 1333 px, float32 and bfloat16; and at 800 px through the torch code
# (WSBCN_TRITON=0). The tables land in $GPU_CHECK_OUT, each stage's start time in its progress.log;
# the exit status is the tests' (the benchmarks run either way).
# Environment: PYTHON (default python3), GPU_CHECK_OUT (default docs/gpu), GPU_CHECK_REPS (30: a 95% interval
# of the median ratio from the 10th to the 21st ratio).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-docs/gpu}
REPS=${GPU_CHECK_REPS:-30}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'gpu-check needs a CUDA device'" || exit 1

stage() { echo "$(date +%T) $*" | tee -a "$OUT/progress.log"; }
bench() {  # NAME ARGS...
    local name=$1
    shift
    stage "$name"
    "$PY" tools/benchmark.py --device cuda --images 2 --variants GN GN+WS BCN+WS --warmup 3 \
        --json "$OUT/$name.json" --markdown "$OUT/$name.md" "$@" || tests=1
}
tests=0
bench benchmark_fp32_800 --sizes 800 --reps "$REPS"
bench benchmark_bf16_800 --sizes 800 --reps "$REPS" --amp
stage tests
"$PY" -m pytest tests/layers tests/modeling/test_triton_model.py -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || tests=1
# one norm layer, training and inference: host and wall time per call against GroupNorm
stage benchmark_layers
"$PY" tools/benchmark_layers.py --device cuda --profile > "$OUT/benchmark_layers.md" || tests=1
WSBCN_TRITON_DIRECT=0 "$PY" tools/benchmark_layers.py --device cuda > "$OUT/benchmark_layers_triton_launch.md" || tests=1
WSBCN_TRITON=0 "$PY" tools/benchmark_layers.py --device cuda > "$OUT/benchmark_layers_torch_code.md" || tests=1
cat "$OUT"/benchmark_layers*.md
bench benchmark_fp32_1333 --sizes 1333 --reps "$REPS"
bench benchmark_bf16_1333 --sizes 1333 --reps "$REPS" --amp
WSBCN_TRITON=0 bench benchmark_fp32_torch_code --sizes 800 --reps 5
stage done
# the tests' summary again last, so that a cut output still shows it
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$OUT/tests.log"
echo "gpu-check: tests exit status $tests; tables in $OUT/, test log in $OUT/tests.log"
exit $tests
