#!/usr/bin/env bash
# Builds (or updates) the virtual environment lora_env/ next to this script.
#   ./setup_forge.sh                      CPU machine: torch 2.13.0
#   TORCH_SPEC='torch==2.13.0' \
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128 ./setup_forge.sh    cluster GPU node
# With a CUDA build of torch the extra `cuda` (bitsandbytes) is installed too; LORAFORGE_EXTRAS
# replaces the extras. An already-installed torch is kept; every later pip call holds it fixed
# (constraints file), so nothing can swap it for another build. Idempotent: a second run with
# nothing changed takes seconds. It prints its progress and the packages it installed; pip's own
# output is in lora_env/pip.log.
set -euo pipefail

# pip_install PYTHON LOG ARGS...: `pip install ARGS` in PYTHON's environment, quietly. pip's
# output is appended to LOG; here it is shown in full when pip fails, and otherwise only what is
# not a "WARNING: Location 'file:...' is ignored" line (a file:// index in the machine's pip
# config that has no folder for some project: pip then finds it in its other indexes).
pip_install() {
    local py=$1 log=$2 out status=0
    shift 2
    out=$(mktemp)
    echo "== pip install $*" >>"$log"
    "$py" -m pip --disable-pip-version-check --quiet install "$@" >"$out" 2>&1 || status=$?
    cat "$out" >>"$log"
    if [ "$status" -ne 0 ]; then
        cat "$out" >&2
    else
        grep -v "^WARNING: Location 'file:.*' is ignored" "$out" || true
    fi
    rm -f "$out"
    return "$status"
}

# installed_since BEFORE PYTHON: the packages (name==version) in PYTHON's environment that are
# not in BEFORE (an earlier `pip list --format=freeze`), comma-separated.
installed_since() {
    comm -13 <(echo "$1" | sort) <("$2" -m pip list --format=freeze 2>/dev/null | sort) \
        | paste -sd, - | sed 's/,/, /g'
}

# Sourced (the tests do), only the functions above are defined: `return` works only there.
if (return 0 2>/dev/null); then
    return 0
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
env_dir=${LORA_ENV:-$here/lora_env}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$env_dir/bin/python" ]; then
    echo "setup_forge: creating $env_dir"
    "$python" -m venv "$env_dir"
fi
py="$env_dir/bin/python"
log="$env_dir/pip.log"
before=""  # the packages before this run installed any, for the list of what it installed

if ! "$py" -c 'import torch' 2>/dev/null; then
    before=$("$py" -m pip list --format=freeze 2>/dev/null)
    echo "setup_forge: installing $torch_spec (pip's output: $log)"
    pip_install "$py" "$log" "$torch_spec"
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
before=${before:-$("$py" -m pip list --format=freeze 2>/dev/null)}
pip_install "$py" "$log" -c "$env_dir/constraints.txt" -e "$here[$extras]"
installed=$(installed_since "$before" "$py")
echo "setup_forge: installed ${installed:-loraforge (editable; every dependency was there)}" \
    | fold -s -w 100
echo "$stamp" >"$env_dir/.forge-stamp"
echo "setup_forge: ready. Activate with: source $env_dir/bin/activate"
