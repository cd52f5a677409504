#!/usr/bin/env bash
# The test suite on a fresh machine: Chromium for the map's browser test, a .venv with the CPU build of
# torch first (so nothing pulls the CUDA wheels), the package with its analysis, embed, bigquery, pipeline and
# test extras, then ruff and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[analysis,embed,bigquery,pipeline,test]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
