#!/usr/bin/env bash
# Set up, then run the test suite. Extra arguments go to pytest (e.g. -m "not slow", -k resume).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
