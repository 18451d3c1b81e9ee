# Sourced by .ci/install and .ci/setup: find a Python >= 3.12 and make ./.venv with it.

good_python() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.14 python3.13 python3.12 python3 python \
        "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 && good_python "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "scout-diff-cache needs Python >= 3.12 (mitmproxy 12); none found. Set PYTHON=/path/to/python3.12." >&2
    return 1
}

make_venv() {
    if [ ! -x .venv/bin/python ] || ! good_python .venv/bin/python; then
        rm -rf .venv
        "$(find_python)" -m venv .venv
    fi
}
