#!/usr/bin/env bash
# The text-column path (Testing/Python/test_columns.py) on every pandas line the module can meet in a
# Slicer: 2.0 (Python 3.11: it has no 3.12 wheel), 2.1, 2.2, 2.3 and 3.x, each in a small virtual environment
# (.lanes/pandas-<version>: pandas, pyarrow, numpy, pytest only). Then Slicer 5.8's Python 3.9 with pandas
# 2.3.3 (what pip gives it for `pandas>=2.0` when no idc-index holds pandas back) answers the same NLST-Sybil
# searches as the full lane's .venv (scripts/neighbours_snapshot.py in both; skipped without the shared data
# or without a .venv). scripts/slicer_lanes.sh calls this; it takes about a minute once pip's cache is warm.
#   bash scripts/pandas_versions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lane_python.sh
pip_quiet=(-m pip install --quiet --disable-pip-version-check)

# python  pandas  the numpy and pyarrow it is used with (pandas < 2.2 predates numpy 2; pyarrow >= 21 needs it)
cases=(
    "3.11 pandas==2.0.3 numpy<2 pyarrow==17.0.0"
    "3.12 pandas==2.1.4 numpy<2 pyarrow==17.0.0"
    "3.12 pandas==2.2.3 pyarrow"
    "3.12 pandas==2.3.3 pyarrow"
    "3.12 pandas>=3,<4 pyarrow"
)
failed=()
for case in "${cases[@]}"; do
    read -r version pandas pins <<<"$case"
    python=$(lane_python "$version")
    label=${pandas#pandas}
    label=${label//[<>=]/}
    venv=".lanes/pandas-${label%%,*}"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    # shellcheck disable=SC2086  # $pins: zero or more requirements
    "$venv/bin/python" "${pip_quiet[@]}" "$pandas" pytest $pins
    echo "== pandas $("$venv/bin/python" -c 'import pandas; print(pandas.__version__)') on $("$venv/bin/python" --version)"
    PYTHONPATH="$PWD/SimilarPatients" "$venv/bin/python" -m pytest -q -p no:cacheprovider Testing/Python/test_columns.py ||
        failed+=("$pandas")
done

data=../shared/data/nlst-sybil-embeddings
if [ -d "$data/upstream/embeddings" ] && [ -x .venv/bin/python ]; then
    venv=.lanes/pandas-2.3.3-py3.9
    [ -x "$venv/bin/python" ] || "$(lane_python 3.9)" -m venv "$venv"
    { cat Testing/lanes/slicer-5.8.txt; echo "pandas==2.3.3"; } >"$venv/constraints.txt"
    "$venv/bin/python" "${pip_quiet[@]}" -e . --constraint "$venv/constraints.txt"
    "$venv/bin/python" scripts/neighbours_snapshot.py "$data" >"$venv/neighbours.json"
    PYTHONPATH="$PWD/SimilarPatients" .venv/bin/python scripts/neighbours_snapshot.py "$data" >.lanes/full-lane-neighbours.json
    if cmp -s "$venv/neighbours.json" .lanes/full-lane-neighbours.json; then
        echo "== pandas 2.3.3 on Python 3.9: the same NLST-Sybil neighbours as the full lane"
    else
        diff "$venv/neighbours.json" .lanes/full-lane-neighbours.json | head -20 >&2
        failed+=("neighbours on Python 3.9 with pandas 2.3.3")
    fi
elif [ -n "${CI:-}" ]; then
    echo "CI needs the shared NLST-Sybil data and the full lane's .venv for the neighbours check" >&2
    exit 1
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "The text columns failed with: ${failed[*]}" >&2
    exit 1
fi
