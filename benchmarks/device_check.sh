#!/usr/bin/env bash
# The GPU checks of issue 6 as one prepared call on a lent accelerator machine (the
# `device` tool: a copy of this tree, JAX with CUDA already installed there, no
# network, about 15 minutes of device time per session, machine start included):
#
#   bash benchmarks/device_check.sh            # from the repository root
#
# 1. exactness on the accelerator, float64: tracked pieces against direct evaluation
#    on a dense grid, batch = single, the exhaustive truncation set against a grid,
#    propagation = walking (five tests, at most 3 minutes);
# 2. throughput at 16x16: 256 null images, the "precision" search (the search of the
#    si4onnx comparison), all in lockstep on the device, compile apart; the first
#    two images again on the host CPU (p-values and pieces must agree); the FLOP rate
#    of the piece evaluation to set against the device's float64 peak (at most 6
#    minutes).
# Output goes to the terminal and to $OUT (the device tool's folder; default
# /tmp/device-check): device_check.log and throughput.jsonl. Run on a CPU machine it
# does the same on the CPU (slowly: use it there only to check the script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SIZE=${SIZE:-16} BATCH=${BATCH:-256}
{
    date -u
    git rev-parse --short HEAD 2>/dev/null || echo "(no git)"
    nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
    python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
    echo "== 1. exactness on $(python3 -c 'import jax; print(jax.default_backend())')"
    timeout 180 python3 -m pytest -q -x -p no:cacheprovider \
        tests/test_tracking_sampler.py tests/test_dal.py tests/test_tracking_propagate.py \
        -k "exact or dense_grid or batch_equals_single or trained_tiny"
    echo "== 2. throughput, ${SIZE}x${SIZE}, batch $BATCH, precision"
    timeout 360 python3 benchmarks/bench_throughput.py --sizes "$SIZE" \
        --batch "$BATCH" --termination precision --check-cpu 2 \
        --json "$OUT/throughput.jsonl"
    date -u
} 2>&1 | tee "$OUT/device_check.log"
