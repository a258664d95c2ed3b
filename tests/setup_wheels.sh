#!/usr/bin/env bash
# The wheels the tests install offline, downloaded once into lora_env/wheels/: the GPU build of
# onnxruntime that `loraforge models fetch tagger-gpu` installs (tests/test_tagger_gpu.py runs
# that command against this folder as a local package index, so the test itself needs no
# network). `make test` and `make check` call this first. Exit code 1 only when the download
# failed; where PyPI has no wheel for this Python or platform it says that the test will be
# skipped and exits 0.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${LORAFORGE_PYTHON:-$here/lora_env/bin/python}
dest=${WHEELS_DIR:-$here/lora_env/wheels}
requirement=$("$python" -c 'from loraforge.models import gpu_runtime as g; print(f"{g.PACKAGE}=={g.VERSION}")')
name=${requirement%%==*}
version=${requirement##*==}
tag=$("$python" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
if compgen -G "$dest/${name//-/_}-$version-$tag-*.whl" >/dev/null; then
    exit 0
fi
mkdir -p "$dest"
log="$dest/pip.log"
echo "setup_wheels: downloading $requirement (about 260 MB) into $dest"
if ! "$python" -m pip --disable-pip-version-check download --no-deps --only-binary=:all: \
        --dest "$dest" "$requirement" >"$log" 2>&1; then
    if grep -q "No matching distribution" "$log"; then
        echo "setup_wheels: PyPI has no $requirement wheel for this machine: the GPU runtime" \
            "test will be skipped"
        exit 0
    fi
    cat "$log" >&2
    echo "setup_wheels: pip failed (above)" >&2
    exit 1
fi
