#!/usr/bin/env bash
# The main job: set up, train the tiny LM preset on the Python standard library's source,
# report validation bits-per-byte and print a generated sample. Extra arguments go to `routelab train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out="runs/lm-tiny-$(date +%Y%m%d-%H%M%S)"
.venv/bin/routelab train lm-tiny --out "$out" "$@"
