#!/usr/bin/env bash
# The main job on a fresh machine: install into .venv, then run the NLST-Sybil demo (arguments pass through).
# A copy of the NLST-Sybil files beside this checkout (../shared/data) is used instead of a download.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
shared="$(cd .. && pwd)/shared/data/nlst-sybil-embeddings"
if [ -z "${SIMILARPATIENTS_NLST_SYBIL_DIR:-}" ] && [ -d "$shared" ]; then
    export SIMILARPATIENTS_NLST_SYBIL_DIR="$shared"
fi
exec .venv/bin/similar-patients demo "$@"
