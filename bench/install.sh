#!/usr/bin/env bash
# Fresh-clone install time, before (pip from the lock) and after (uv from the lock), in one run.
# Usage: bench/install.sh [REPO]   (default: this checkout). Prints seconds for each; run on an
# idle machine. Caches are emptied first (pip's and uv's), so both download what they need.
set -euo pipefail
repo=$(cd "${1:-$(dirname "$0")/..}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
uptime
for how in pip uv; do
    git clone -q "$repo" "$work/$how"
    rm -rf ~/.cache/pip ~/.cache/uv
    start=$(date +%s.%N)
    if [ "$how" = pip ]; then
        (cd "$work/$how" && python3 -m venv .venv && .venv/bin/pip install -q -c requirements.lock -e '.[dev]')
    else
        (cd "$work/$how" && make -s venv >/dev/null)
    fi
    end=$(date +%s.%N)
    echo "$how: $(echo "$end - $start" | bc) s"
done
uptime
