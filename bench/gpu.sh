#!/usr/bin/env bash
# The prepared GPU benchmark run (issue 9), for a lent GPU machine with PyTorch but no internet:
# wheels of the missing packages travel in .whl/ (see README "Development"). Results land in
# $OUT: the BENCHMARKS.md tables and one log per benchmark.
set -u
out=${OUT:-/tmp/loraforge-bench-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1
export LORAFORGE_BENCH_MODELS=/tmp/loraforge-bench-models
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt"
: >BENCHMARKS.md
note="GPU run of bench/gpu.sh: bf16 autocast, fused AdamW, latents cached, random SD 1.5 weights."
# gradient_checkpointing: peak memory for the small-GPU (<= 6 GB) configuration of issue 9.
timeout 200 python3 -m bench train --model sd15 --batch 4 --steps 24 \
    --variant "train.text_encoder_lr=0" --variant "train.gradient_checkpointing=true" \
    --note "$note" >"$out/train.log" 2>&1
echo "train exit $?" >>"$out/gpu.txt"
timeout 110 python3 -m bench generate --model sd15 --size 512x768 --batch 1 --steps 25 \
    --note "GPU run of bench/gpu.sh: 2 figures, CFG 7, ControlNet OpenPose." \
    >"$out/generate.log" 2>&1
echo "generate exit $?" >>"$out/gpu.txt"
timeout 140 python3 -m bench train --model sd15 --batch 4 --steps 24 \
    --variant "train.compile_unet=true" --note "$note" >"$out/compile.log" 2>&1
echo "compile exit $?" >>"$out/gpu.txt"
cp BENCHMARKS.md "$out/BENCHMARKS-gpu.md"
