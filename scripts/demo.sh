#!/usr/bin/env bash
# The main job on a fresh machine: install into .venv, then run the NLST-Sybil demo (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/similar-patients demo "$@"
