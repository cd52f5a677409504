# Sourced by the lane scripts: lane_python X.Y prints the newest installed Python X.Y (pyenv's, else one on
# PATH), or fails saying how to install it.
lane_python() {
    local wanted=$1 root found
    root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    found=$(ls -d "$root"/versions/"$wanted".*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$found" ] || found=$(command -v "python$wanted" || true)
    if [ -z "$found" ]; then
        echo "Python $wanted is not installed here (pyenv install $wanted)." >&2
        return 1
    fi
    echo "$found"
}
