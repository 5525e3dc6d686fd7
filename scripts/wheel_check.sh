#!/usr/bin/env bash
# Check routelab as a user gets it: build the wheel, install it with the pinned CPU torch into a
# fresh virtual environment, and from another folder run `routelab --version`, `python -m routelab
# --help` and a 2-step training of the lm-tiny preset (so the presets, package data, must be inside
# the wheel). Any failure stops it with a non-zero status. About a minute; called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD_PY=.venv/bin/python  # has pip; scripts/setup.sh creates it
[ -x "$BUILD_PY" ] || BUILD_PY=$PY
tmp=$(mktemp -d "${TMPDIR:-/tmp}/routelab-wheel-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
say() { echo "wheel_check [$((SECONDS - start))s]: $*"; }
fail() { echo "wheel_check: FAILED: $*" >&2; exit 1; }

# The wheel, built from a copy of the source files (tracked or not ignored), so that a stale build/
# or *.egg-info in this checkout cannot slip files into it.
mkdir "$tmp/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - | tar -xf - -C "$tmp/src"
else
  tar --exclude=./.venv --exclude=./runs --exclude=./build --exclude='*.egg-info' --exclude=.git -cf - . | tar -xf - -C "$tmp/src"
fi
"$BUILD_PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$tmp/dist" "$tmp/src" \
  || fail "pip wheel could not build the wheel"
wheel=$(ls "$tmp"/dist/routelab-*.whl)
say "built $(basename "$wheel")"
"$BUILD_PY" - "$wheel" <<'EOF' || fail "the wheel's contents are wrong (above)"
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = {"routelab/__main__.py", "routelab/configs/lm-tiny.yaml", "routelab/configs/compare-lm.yaml"}
missing = sorted(need - names)
strays = sorted(n for n in names if n.split("/")[0] in ("tests", "benchmarks", "scripts"))
if missing or strays:
    sys.exit(f"missing from the wheel: {missing}; not meant for it: {strays[:5]}")
EOF

# A fresh environment: the pinned CPU torch first (an unpinned one pulls a CUDA build), then the wheel.
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0 || fail "installing torch==2.13.0"
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel" || fail "installing the wheel"
"$tmp/venv/bin/python" -m pip check --disable-pip-version-check >/dev/null || fail "pip check: inconsistent dependencies"
say "installed torch==2.13.0 and the wheel into a fresh venv"

# From another folder, with nothing of this checkout on the path.
mkdir "$tmp/elsewhere"
cd "$tmp/elsewhere"
unset PYTHONPATH
where=$("$tmp/venv/bin/python" -c "import routelab; print(routelab.__file__)")
case "$where" in "$tmp/venv/"*) ;; *) fail "routelab was imported from $where, not from the installed wheel" ;; esac
version=$("$tmp/venv/bin/routelab" --version) || fail "routelab --version"
[ "$version" = "routelab $(basename "$wheel" | cut -d- -f2)" ] || fail "routelab --version printed '$version'"
"$tmp/venv/bin/python" -m routelab --help >/dev/null || fail "python -m routelab --help"
"$tmp/venv/bin/routelab" train lm-tiny --set train.steps=2 --set data.max_bytes=200000 --out "$tmp/run" --no-sample \
  >"$tmp/train.out" 2>"$tmp/train.err" || { cat "$tmp/train.err" >&2; fail "routelab train lm-tiny"; }
"$tmp/venv/bin/python" -c "import json, sys; s = json.load(open(sys.argv[1])); sys.exit(0 if s['completed'] and s['steps'] == 2 else 1)" \
  "$tmp/run/summary.json" || fail "the lm-tiny run did not finish its 2 steps"
say "ok: $version; python -m routelab --help; routelab train lm-tiny (2 steps) from $tmp/elsewhere"
