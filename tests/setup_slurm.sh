#!/usr/bin/env bash
# What the SLURM cluster tests (tests/slurm_cluster.py) need: Debian's slurmctld, slurmd,
# slurm-client and munge. `make test` calls this first. As root it installs the missing packages
# with apt; otherwise it says once that the cluster tests will be skipped and how to run them.
# Exit code 1 only when an install was attempted and failed.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge)
programs=(slurmctld slurmd sbatch scontrol squeue scancel sinfo munged munge unmunge)

missing=()
for program in "${programs[@]}"; do
    if ! command -v "$program" >/dev/null && [ ! -x "/usr/sbin/$program" ]; then
        missing+=("$program")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "setup_slurm: ${missing[*]} missing and not root: the SLURM cluster tests will be" \
        "skipped (run \`sudo make test\` to install the packages and run them)"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "setup_slurm: ${missing[*]} missing and no apt-get: the SLURM cluster tests will be" \
        "skipped (install slurmctld, slurmd, the SLURM client and munge, then rerun)"
    exit 0
fi

echo "setup_slurm: installing ${packages[*]} (apt) for the SLURM cluster tests"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${packages[@]}"; } \
        >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup_slurm: apt-get failed (above); install ${packages[*]} by hand, then rerun" >&2
    exit 1
fi
rm -f "$log"
echo "setup_slurm: installed $(dpkg-query -W -f='${Package} ${Version}, ' "${packages[@]}" \
    | sed 's/, $//')"
