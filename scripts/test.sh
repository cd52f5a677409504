#!/usr/bin/env bash
# The test suite on a fresh machine: Chromium for the map's browser test, a .venv with the CPU build of
# torch first (so nothing pulls the CUDA wheels), the package with all its extras, then ruff and pytest (the
# full lane: nothing may be skipped for want of a package); then the Slicer-release lanes
# (scripts/slicer_lanes.sh: Slicer 5.8's Python 3.9 with its packages and pyproject's lowest versions, 5.10's
# and 5.12's Python 3.12 with theirs, each also as the module's first-use install leaves it, and the text
# columns on pandas 2.0 to 3.x). Arguments go to the full lane's pytest, and then the lanes are skipped.
# The full lane, the six lanes and the pandas check are single-process runs, so they run side by side, as many
# at a time as the machine has cores (SIMILARPATIENTS_JOBS overrides); each one's output goes to
# .lanes/logs/<name>.log and is printed whole when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# PyTorch's CPU index (PyPI's Linux torch is the CUDA build); --retries 0: where only a local mirror answers,
# pip finds the +cpu wheel there at once instead of retrying the unreachable index
"${pip[@]}" --retries 0 torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
"${pip[@]}" -e ".[analysis,embed,bigquery,pipeline,download,test]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [ $# -gt 0 ]; then
    SIMILARPATIENTS_FULL_LANE=1 exec .venv/bin/python -m pytest "$@"
fi

# the lanes' interpreters found (or fetched by uv) once, before the lanes look for them side by side
source scripts/lane_python.sh
for version in 3.9 3.11 3.12; do lane_python "$version" >/dev/null || true; done

run() {
    case $1 in
        full-lane) SIMILARPATIENTS_FULL_LANE=1 .venv/bin/python -m pytest ;;
        pandas-versions) bash scripts/pandas_versions.sh ;;
        *) bash scripts/slicer_lanes.sh "$1" ;;
    esac
}
pending=(full-lane slicer-5.8-installed slicer-5.8 slicer-5.10-installed slicer-5.10 slicer-5.12-installed
    slicer-5.12 pandas-versions)
jobs=${SIMILARPATIENTS_JOBS:-$(nproc)}
mkdir -p .lanes/logs
declare -A name_of=() started_at=()
failed=()
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
while [ ${#pending[@]} -gt 0 ] || [ ${#name_of[@]} -gt 0 ]; do
    while [ ${#pending[@]} -gt 0 ] && [ ${#name_of[@]} -lt "$jobs" ]; do
        name=${pending[0]}
        pending=("${pending[@]:1}")
        run "$name" >".lanes/logs/$name.log" 2>&1 &
        name_of[$!]=$name
        started_at[$name]=$SECONDS
        echo "-- $name started"
    done
    status=0
    wait -n -p done_pid "${!name_of[@]}" || status=$?
    name=${name_of[$done_pid]}
    unset "name_of[$done_pid]"
    minutes=$(((SECONDS - started_at[$name] + 30) / 60))
    echo "== $name: $([ "$status" -eq 0 ] && echo passed || echo "FAILED (exit $status)") in $minutes min"
    cat ".lanes/logs/$name.log"
    [ "$status" -eq 0 ] || failed+=("$name")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "Failed: ${failed[*]}" >&2
    exit 1
fi
echo "All lanes passed in $(((SECONDS + 30) / 60)) min"
