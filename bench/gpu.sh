#!/usr/bin/env bash
# The prepared GPU benchmark run (issue 20), for a lent GPU machine with PyTorch but no internet:
# wheels of the missing packages travel in .whl/ (see README "Development"). Results land in
# $OUT: the BENCHMARKS.md tables (BENCHMARKS-gpu.md) and one log per benchmark. Each benchmark
# has a time limit; the whole run ends within 590 s (a device call's limit is 600 s), and a
# benchmark cut off by its limit still leaves the rows it finished in its log.
set -u
out=${OUT:-/tmp/loraforge-bench-out}
mkdir -p "$out"
started=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1
export LORAFORGE_BENCH_MODELS=/tmp/loraforge-bench-models
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt"
nproc >>"$out/gpu.txt"
: >BENCHMARKS.md
bench() {  # name, seconds (0: what is left of the 590), arguments...
    local name=$1 limit=$2
    shift 2
    [ "$limit" -gt 0 ] || limit=$((590 - (SECONDS - started)))
    timeout "$limit" python3 -m bench "$@" >"$out/$name.log" 2>&1
    echo "$name exit $? after $((SECONDS - started)) s" >>"$out/gpu.txt"
    cp BENCHMARKS.md "$out/BENCHMARKS-gpu.md"
}
note="GPU run of bench/gpu.sh: bf16 autocast, fused AdamW, latents cached, random SD 1.5 weights, LoRA dim 16 on kohya's 192 U-Net and 72 text-encoder modules."
# Batch 16: the eager trainer, channels-last, compiled transformer blocks, and the two reference
# loops (also builds the random SD 1.5 models, on the GPU: seconds).
bench train16 175 train --model sd15 --batch 16 --steps 24 \
    --variant "train.channels_last=true" --variant "train.compile_unet=blocks" --note "$note"
scene="GPU run of bench/gpu.sh: 2 character LoRAs merged at 0.8, CFG 7, ControlNet, DPM++ 2M Karras."
bench generate 150 generate --model sd15 --size 512x768 --batch 1 --steps 25 --loras 2 \
    --variant compile=graphs --variant compile --note "$scene"
bench train4 75 train --model sd15 --batch 4 --steps 32 \
    --variant "train.channels_last=true" --note "$note"
# The whole U-Net compiled and replayed as CUDA graphs (the longest compile, so last), at the
# batch where kernel launches weigh most.
bench graphs 0 train --model sd15 --batch 4 --steps 32 --skip-reference \
    --variant "train.compile_unet=graphs" --note "$note"
