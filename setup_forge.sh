#!/usr/bin/env bash
# Builds (or updates) the virtual environment lora_env/ next to this script.
#   ./setup_forge.sh                      CPU machine: torch 2.13.0
#   TORCH_SPEC='torch==2.13.0' \
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128 ./setup_forge.sh    cluster GPU node
# With a CUDA build of torch the extra `cuda` (bitsandbytes) is installed too; LORAFORGE_EXTRAS
# replaces the extras. An already-installed torch is kept; every later pip call holds it fixed
# (constraints file), so nothing can swap it for another build. Idempotent: a second run with
# nothing changed takes seconds.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
env_dir=${LORA_ENV:-$here/lora_env}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$env_dir/bin/python" ]; then
    echo "setup_forge: creating $env_dir"
    "$python" -m venv "$env_dir"
fi
py="$env_dir/bin/python"
pip=("$py" -m pip --disable-pip-version-check --quiet)

if ! "$py" -c 'import torch' 2>/dev/null; then
    echo "setup_forge: installing $torch_spec"
    "${pip[@]}" install "$torch_spec"
fi
"$py" -W ignore -c 'import torch; print("torch==" + torch.__version__)' >"$env_dir/constraints.txt"
# A CUDA build of torch also gets bitsandbytes (the default optimizer, AdamW8bit, needs it).
if "$py" -W ignore -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
    extras=${LORAFORGE_EXTRAS:-test,optimizers,cuda}
else
    extras=${LORAFORGE_EXTRAS:-test,optimizers}
fi

stamp=$(cat "$here/pyproject.toml" "$env_dir/constraints.txt" | sha256sum | cut -c1-16)
stamp="$stamp $extras"
if [ "$(cat "$env_dir/.forge-stamp" 2>/dev/null)" = "$stamp" ] && "$py" -c 'import loraforge' 2>/dev/null; then
    echo "setup_forge: $env_dir is up to date ($(cat "$env_dir/constraints.txt"))"
    exit 0
fi

echo "setup_forge: installing loraforge[$extras] (torch held at $(cat "$env_dir/constraints.txt"))"
"${pip[@]}" install -c "$env_dir/constraints.txt" -e "$here[$extras]"
echo "$stamp" >"$env_dir/.forge-stamp"
echo "setup_forge: ready. Activate with: source $env_dir/bin/activate"
