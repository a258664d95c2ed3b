#!/usr/bin/env bash
# The reference pose detector for the real-photograph test (tests/test_pose_extract.py): Google's
# MediaPipe BlazePose, whose trained weights ship inside its wheel (0.10.14 carries the pose
# model and runs beside numpy 2; 0.10.21 pins numpy<2, 0.10.35 no longer ships the model). It
# needs protobuf 4, which our environment's onnx and tensorboard refuse, so it lives in its own
# environment, lora_env/reference/, and the test runs it as a subprocess
# (tests/reference_pose.py). `make test` and `make check` call this first.
# Every package is pinned and installed without dependency resolution: mediapipe's declared jax,
# jaxlib, sounddevice and GUI OpenCV are left out, since the pose solution does not import
# them (headless OpenCV stands in). Exit code 1 only when an install failed; where no wheel
# exists (a Python other than 3.11 or 3.12, or a platform without one) it says that the test
# will be skipped and exits 0.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_dir=${REFERENCE_ENV:-$here/lora_env/reference}
python=${PYTHON:-python3}
pins=(mediapipe==0.10.14 absl-py==2.5.1 attrs==26.1.0 flatbuffers==25.12.19 protobuf==4.25.9
      numpy==2.4.6 pillow==13.0.0 opencv-python-headless==5.1.0.95 matplotlib==3.11.2
      contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 packaging==26.4
      pyparsing==3.3.3 python-dateutil==4.0.0 tzdata==2026.6)
stamp="${pins[*]}"

if [ "$(cat "$env_dir/.reference-stamp" 2>/dev/null)" = "$stamp" ]; then
    exit 0
fi
if ! "$python" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))'; then
    echo "setup_reference: mediapipe 0.10.14 has no wheel for $("$python" -V): the" \
        "real-photograph pose test will be skipped (PYTHON=python3.12 $0 builds it)"
    exit 0
fi

echo "setup_reference: building $env_dir (MediaPipe BlazePose, the reference pose detector)"
rm -rf "$env_dir"
"$python" -m venv "$env_dir"
log="$env_dir/pip.log"
if ! "$env_dir/bin/python" -m pip --disable-pip-version-check install --no-deps "${pins[@]}" \
        >"$log" 2>&1; then
    if grep -q "No matching distribution" "$log"; then
        echo "setup_reference: $(grep -m1 "No matching distribution" "$log" | sed 's/^ERROR: //')" \
            "for this machine: the real-photograph pose test will be skipped"
        rm -rf "$env_dir"
        exit 0
    fi
    cat "$log" >&2
    echo "setup_reference: pip failed (above)" >&2
    exit 1
fi
if ! "$env_dir/bin/python" -c 'from mediapipe.python.solutions import pose' >>"$log" 2>&1; then
    echo "setup_reference: mediapipe does not import here (see $log)" >&2
    exit 1
fi
echo "$stamp" >"$env_dir/.reference-stamp"
