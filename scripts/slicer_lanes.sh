#!/usr/bin/env bash
# The Slicer-release lanes: the tests run again in each Slicer release's Python with the packages it bundles
# (Testing/lanes/<release>.txt, read from Slicer's SuperBuild at that tag, pip included), each twice:
#   slicer-X          "declared": the library as pyproject declares it (Slicer 5.8: pyproject's lowest
#                     versions, Testing/lanes/pyproject-lowest.txt; 5.10/5.12: pyproject's requirements as
#                     pip resolves them under Slicer's pins);
#   slicer-X-installed  what a user gets: the module's own first-use install (scripts/first_use_install.py:
#                     its one plan, its dry run, its constraints), then the library without dependencies and
#                     the test tools held to what that install chose.
# Then the text columns on every pandas line (scripts/pandas_versions.sh). torch has no wheel for these
# Pythons here, so tests marked `torch` are skipped there (conftest.py); everything else runs.
#   bash scripts/slicer_lanes.sh                          # every lane
#   bash scripts/slicer_lanes.sh slicer-5.8-installed     # one lane (pytest arguments may follow after --)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lane_python.sh
lanes=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do lanes+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
all=${#lanes[@]}
[ "$all" -gt 0 ] || lanes=(slicer-5.8 slicer-5.8-installed slicer-5.10 slicer-5.10-installed slicer-5.12
    slicer-5.12-installed)

failed=()
for lane in "${lanes[@]}"; do
    release=${lane%-installed}
    pins="Testing/lanes/$release.txt"
    [ -f "$pins" ] || { echo "No lane '$lane' ($pins)" >&2; exit 2; }
    python=$(lane_python "$(sed -n 's/^# python: //p' "$pins")")
    echo "== lane $lane: $("$python" --version) with $pins"
    venv=".lanes/$lane"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
    "${pip[@]}" -r "$pins"
    if [ "$lane" = "$release" ]; then  # declared
        declared=$(sed -n 's/^# declared: //p' "$pins" | cut -d' ' -f1)
        cat "$pins" ${declared:+"$declared"} >"$venv/constraints.txt"
        [ -z "$declared" ] || "${pip[@]}" -r "$declared" --constraint "$pins"
        "${pip[@]}" -e ".[bigquery,test]" --constraint "$venv/constraints.txt"
    else  # as installed: the module's own install, then only what the tests add
        PYTHONPATH="$PWD/SimilarPatients" "$venv/bin/python" scripts/first_use_install.py
        "$venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check >"$venv/constraints.txt"
        "${pip[@]}" --no-deps -e .
        "${pip[@]}" -e ".[test]" --constraint "$venv/constraints.txt"
    fi
    "$venv/bin/python" - "$venv/constraints.txt" <<'PY'
import sys
from importlib.metadata import version
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, pinned = line.split("==")
        assert version(name) == pinned, f"{name} is {version(name)}, not the lane's {pinned}"
print("pinned versions in place")
PY
    # tests marked slow (the NLST-Sybil hubness bounds, the sdist install, ...) prove the science and the cloud
    # paths once, in the full lane; the lanes prove the releases' packages and are run without them
    SIMILARPATIENTS_LANE="$lane" "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" "$@" ||
        failed+=("$lane")
done
[ "$all" -gt 0 ] || bash scripts/pandas_versions.sh || failed+=("pandas versions")
if [ ${#failed[@]} -gt 0 ]; then
    echo "Failed in: ${failed[*]}" >&2
    exit 1
fi
