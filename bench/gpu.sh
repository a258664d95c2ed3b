#!/usr/bin/env bash
# The prepared GPU benchmark run (issue 9), for a lent GPU machine with PyTorch but no internet:
# wheels of the missing packages travel in .whl/ (see README "Development"). Results land in
# $OUT: the BENCHMARKS.md tables and one log per benchmark. About 9 minutes on an H100.
set -u
out=${OUT:-/tmp/loraforge-bench-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1
export LORAFORGE_BENCH_MODELS=/tmp/loraforge-bench-models
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt"
: >BENCHMARKS.md
bench() {  # name, seconds, arguments...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 -m bench "$@" >"$out/$name.log" 2>&1
    echo "$name exit $?" >>"$out/gpu.txt"
    cp BENCHMARKS.md "$out/BENCHMARKS-gpu.md"
}
note="GPU run of bench/gpu.sh: bf16 autocast, fused AdamW, latents cached, random SD 1.5 weights."
# Peak memory of latent caching and of one LoRA step (the <= 6 GB configuration of issue 9);
# the first benchmark also builds the random SD 1.5 models (about a minute).
bench memory 110 memory --model sd15 --vae-batch 1 8 --batch 1 4
# text_encoder_lr=0: U-Net only, as the reference; gradient_checkpointing: the small-GPU setup.
bench train 160 train --model sd15 --batch 4 --steps 24 \
    --variant "train.text_encoder_lr=0" --variant "train.gradient_checkpointing=true" \
    --note "$note"
scene="GPU run of bench/gpu.sh: 2 figures, 2 character LoRAs at 0.8, CFG 7, ControlNet."
bench generate 50 generate --model sd15 --size 512x768 --batch 1 --steps 25 --loras 2 \
    --note "$scene"
# generate.batch_size 4, and the candidates for defaults: each variant in its own pipeline.
bench generate-variants 160 generate --model sd15 --size 512x768 --batch 4 --steps 25 \
    --loras 2 --variant compile=blocks --variant fuse_qkv --variant channels_last \
    --note "$scene"
bench compile 80 train --model sd15 --batch 4 --steps 24 \
    --variant "train.compile_unet=blocks" --note "$note"
