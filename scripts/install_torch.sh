#!/bin/sh
# Installs torch into the virtual environment of the pip at $1. PyPI's torch for Linux is the multi-GB
# CUDA build: it is installed only where an NVIDIA GPU answers; elsewhere the CPU build comes from
# PyTorch's CPU wheel index (the command PyTorch's install page gives), with pip. Where that index cannot
# be reached, torch comes from pip's configured sources: with the uv in UV if set, else with pip.
set -eu
PIP="$1"
TORCH="torch==2.13.0"
CPU_INDEX="https://download.pytorch.org/whl/cpu"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    exec "$PIP" install --quiet "$TORCH"
fi

# pip retries an unreachable index at length and prints each failure, so ask once, briefly, first.
if ! "$(dirname "$PIP")/python" -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=10)' "$CPU_INDEX/torch/" 2>/dev/null; then
    echo "warning: no NVIDIA GPU here, and $CPU_INDEX cannot be reached: installing $TORCH from pip's" \
        "configured indexes, which may be the multi-GB CUDA build" >&2
    if [ -n "${UV:-}" ]; then  # twice as fast (2-core Zen 1: 18 s, pip 39 s), and 15 s again from uv's cache
        # uv reads no pip configuration: pip's find-links (where a machine keeps wheels, a CPU build among them)
        # are passed on; the indexes are uv's, as for every other package make installs.
        links="${PIP_FIND_LINKS:-$("$PIP" config get global.find-links 2>/dev/null || true)}"
        set -- $(for link in $links; do printf -- '--find-links %s ' "$link"; done)
        exec "$UV" pip install --quiet --compile-bytecode --python "$(dirname "$PIP")/python" "$TORCH" "$@"
    fi
    exec "$PIP" install --quiet "$TORCH"
fi

# --index-url replaces pip's configured index; it comes back as an extra one (configured extra
# indexes and find-links stay), so torch's dependencies resolve as they always do. Of torch itself,
# 2.13.0+cpu sorts above PyPI's 2.13.0 and wins.
configured_index="${PIP_INDEX_URL:-$("$PIP" config get install.index-url 2>/dev/null ||
    "$PIP" config get global.index-url 2>/dev/null || echo https://pypi.org/simple)}"
exec "$PIP" install --quiet "$TORCH" --index-url "$CPU_INDEX" --extra-index-url "$configured_index"
