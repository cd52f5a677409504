#!/usr/bin/env bash
# The test suite on a fresh machine: Chromium for the map's browser test, a .venv with the CPU build of
# torch first (so nothing pulls the CUDA wheels), the package with all its extras, then ruff and pytest (the
# full lane: nothing may be skipped for want of a package); then the Slicer-release lanes
# (scripts/slicer_lanes.sh: Slicer 5.8's Python 3.9 with its packages and pyproject's lowest versions, 5.10's
# and 5.12's Python 3.12 with theirs, each also as the module's first-use install leaves it, and the text
# columns on pandas 2.0 to 3.x). Arguments go to the full lane's pytest, and then the lanes are skipped.
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
SIMILARPATIENTS_FULL_LANE=1 .venv/bin/python -m pytest "$@"
[ $# -gt 0 ] || bash scripts/slicer_lanes.sh
