#!/usr/bin/env bash
# The Slicer-release lanes: the tests run again in each Slicer release's Python with the packages it bundles
# (Testing/lanes/<lane>.txt, read from Slicer's SuperBuild at that tag; the 5.8 lane also pins the lowest
# versions pyproject declares). torch has no wheel for these Pythons here, so tests marked `torch` are skipped
# there (conftest.py); everything else runs: library, CLI, store, search, the weight-free model end to end,
# the Slicer module's controller, scene/ on slicer-core (Python >= 3.10) and the query worker.
#   bash scripts/slicer_lanes.sh                 # every lane
#   bash scripts/slicer_lanes.sh slicer-5.8      # one lane (pytest arguments may follow after --)
set -euo pipefail
cd "$(dirname "$0")/.."
lanes=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do lanes+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#lanes[@]} -gt 0 ] || lanes=(slicer-5.8 slicer-5.10 slicer-5.12)

interpreter() {  # Python X.Y: pyenv's newest, else one on PATH, else uv's (uv from PyPI into .lanes/uv; `uv python
    # install` fetches a standalone build from GitHub the first time, so a machine without pyenv's X.Y needs that access)
    local wanted=$1 root found uv=.lanes/uv/bin/uv
    root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    found=$(ls -d "$root"/versions/"$wanted".*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$found" ] || found=$(command -v "python$wanted" || true)
    if [ -z "$found" ]; then
        { [ -x "$uv" ] || { python3 -m venv .lanes/uv && .lanes/uv/bin/python -m pip install -q uv; }; } >&2 || true
        { [ -x "$uv" ] && "$uv" python install "$wanted" >&2 && found=$("$uv" python find "$wanted"); } || true
    fi
    echo "$found"
}

failed=()
for lane in "${lanes[@]}"; do
    pins="Testing/lanes/$lane.txt"
    [ -f "$pins" ] || { echo "No lane '$lane' ($pins)" >&2; exit 2; }
    version=$(sed -n 's/^# python: //p' "$pins")
    python=$(interpreter "$version")
    if [ -z "$python" ]; then
        echo "Lane $lane needs Python $version: none here, and uv could not fetch one (offline?). Install it" \
            "with \`pyenv install $version\` or \`uv python install $version\` where GitHub is reachable." >&2
        exit 1
    fi
    echo "== lane $lane: $("$python" --version) with $pins"
    venv=".lanes/$lane"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
    "${pip[@]}" -r "$pins"
    "${pip[@]}" -e ".[bigquery,test]" --constraint "$pins"
    "$venv/bin/python" - "$pins" <<'PY'
import sys
from importlib.metadata import version
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.split("#")[0].strip()
    if line:
        name, pinned = line.split("==")
        assert version(name) == pinned, f"{name} is {version(name)}, not the lane's {pinned}"
print("pinned versions in place")
PY
    SIMILARPATIENTS_LANE="$lane" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" || failed+=("$lane")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "Failed in: ${failed[*]}" >&2
    exit 1
fi
