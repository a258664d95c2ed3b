#!/usr/bin/env bash
# The prepared GPU benchmark run (issue 20), for a lent GPU machine with PyTorch but no internet:
# wheels of the missing packages travel in .whl/ (see README "Development"). Results land in
# $OUT: the BENCHMARKS.md tables (BENCHMARKS-gpu.md) and one log per benchmark. Each benchmark
# has a time limit and the whole run ends within $GPU_SECONDS (default 590; a device call's
# limit is 600 s); a benchmark cut off by its limit still leaves the rows it finished in its log.
set -u
out=${OUT:-/tmp/loraforge-bench-out}
budget=${GPU_SECONDS:-590}
mkdir -p "$out"
started=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1
export LORAFORGE_BENCH_MODELS=/tmp/loraforge-bench-models
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt"
python3 -c "import loraforge.config, diffusers, peft" 2>>"$out/gpu.txt" || exit 1
: >BENCHMARKS.md
bench() {  # name, seconds (0: what is left of the budget), arguments...
    local name=$1 limit=$2 left=$((budget - (SECONDS - started)))
    shift 2
    [ "$limit" -gt 0 ] && [ "$limit" -lt "$left" ] || limit=$left
    [ "$limit" -gt 10 ] || return
    timeout "$limit" python3 -m bench "$@" >"$out/$name.log" 2>&1
    echo "$name exit $? after $((SECONDS - started)) s" >>"$out/gpu.txt"
    cp BENCHMARKS.md "$out/BENCHMARKS-gpu.md"
}
note="GPU run of bench/gpu.sh: bf16 autocast, fused AdamW, latents cached, random SD 1.5 weights, LoRA dim 16 on kohya's 192 U-Net and 72 text-encoder modules; channels-last (the GPU default)."
# The demo-sized job (#20: under 60 s wall, loading and caching included): the demo's project
# on the tiny model at 512 px, 1,500 steps, through `loraforge train`.
bench job 90 job --model tiny --resolution 512 --steps 1500 --timeout 65 \
    --note "GPU run of bench/gpu.sh: the demo's project as init --tiny writes it for this machine."
# Batch 16 and 4: the trainer, the two reference loops, then compiled transformer blocks on top
# of channels-last (the first builds the random SD 1.5 models, on the GPU: seconds). At batch 16
# also like for like: the cached reference adapting kohya's U-Net modules against ours U-Net
# only, and the plain reference training those and a text-encoder LoRA against ours' defaults.
bench train16 190 train --model sd15 --batch 16 --steps 24 --same-modules \
    --variant "train.compile_unet=blocks" --variant "train.text_encoder_lr=0" --note "$note"
bench train4 100 train --model sd15 --batch 4 --steps 32 \
    --variant "train.compile_unet=blocks" --note "$note"
scene="GPU run of bench/gpu.sh: 2 character LoRAs merged at 0.8, CFG 7, ControlNet, DPM++ 2M Karras."
bench generate 160 generate --model sd15 --size 512x768 --batch 1 4 --steps 25 --loras 2 \
    --variant compile=blocks --variant compile --note "$scene"
# Casting's cost (issue 16): the same two-figure scene not cast, cast with one shared LoRA, and
# with a LoRA per figure, through `loraforge generate`.
bench casting 50 casting --model sd15 --size 512x768 --steps 25 --repeats 2 \
    --note "GPU run of bench/gpu.sh: casting's cost per image (issue 16), generate's defaults, CFG 7, ControlNet."
# Pose extraction (issue 17) on the GPU: the body and hand networks per 1024x768 picture.
left=$((budget - (SECONDS - started)))
[ "$left" -gt 20 ] && timeout "$left" python3 -m bench.pose --device cuda --threads 8 \
    >"$out/pose.log" 2>&1
