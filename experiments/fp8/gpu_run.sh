#!/usr/bin/env bash
# The GPU part of docs/fp8.md, as run on a lent H100 through the `device` tool (python3 there holds torch).
#   experiments/fp8/gpu_run.sh check              # CUDA tests + benchmarks/fp8_step.py --device cuda + a timing probe
#   experiments/fp8/gpu_run.sh exp PRESET STEPS   # experiment 4a, the 4 runs (2 seeds x fp32/FP8) in parallel
# Logs and result files are copied to $OUT (the device tool brings that folder back).
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/linglab-gpu-out}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
case "${1:-check}" in
check)
    python3 -m pytest -q -rs tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -40
    python3 benchmarks/fp8_step.py --device cuda 2>&1 | tee "$OUT/fp8_step_cuda.log"
    cp benchmarks/results/fp8_step_cuda.json "$OUT/"
    python3 experiments/fp8/fp8_vs_fp32.py --preset small --steps 30 --seeds 1 --device cuda --monitor-every 10 \
        > "$OUT/probe.log" 2>&1
    tail -5 "$OUT/probe.log"
    cat experiments/fp8/runs/small-30-*/done.json
    ;;
exp)
    preset=$2 steps=$3
    args=(--preset "$preset" --steps "$steps" --seeds 2 --device cuda)
    for v in fp32 fp8 fp32-seed1 fp8-seed1; do
        python3 experiments/fp8/fp8_vs_fp32.py "${args[@]}" --only "$v" > "$OUT/train_$v.log" 2>&1 &
    done
    wait
    python3 experiments/fp8/fp8_vs_fp32.py "${args[@]}" 2>&1 | tee "$OUT/exp_${preset}.log"
    cp experiments/fp8/results/fp8_vs_fp32_"$preset".{json,png} "$OUT/"
    cat experiments/fp8/runs/"$preset-$steps"-*/done.json
    tar czf "$OUT/metrics_${preset}.tgz" experiments/fp8/runs/"$preset-$steps"-*/{metrics.jsonl,done.json,config.toml}
    ;;
esac
