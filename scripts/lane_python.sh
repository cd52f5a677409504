# Sourced by the lane scripts: lane_python X.Y prints the newest Python X.Y here: pyenv's, else one on PATH,
# else uv's (uv from PyPI into .lanes/uv; `uv python install` fetches a standalone build from GitHub the
# first time, so a machine without pyenv's X.Y needs that access); or fails saying how to install it.
lane_python() {
    local wanted=$1 root found uv=.lanes/uv/bin/uv
    root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    found=$(ls -d "$root"/versions/"$wanted".*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$found" ] || found=$(command -v "python$wanted" || true)
    if [ -z "$found" ]; then
        { [ -x "$uv" ] || { python3 -m venv .lanes/uv && .lanes/uv/bin/python -m pip install -q uv; }; } >&2 || true
        { [ -x "$uv" ] && "$uv" python install "$wanted" >&2 && found=$("$uv" python find "$wanted"); } || true
    fi
    if [ -z "$found" ]; then
        echo "Python $wanted is not installed here, and uv could not fetch it (offline?): install it with" \
            "\`pyenv install $wanted\` or \`uv python install $wanted\` where GitHub is reachable." >&2
        return 1
    fi
    echo "$found"
}
