#!/usr/bin/env bash
# The main job: set up, then compare routing variants of the tiny LM on the Python standard library's
# source (routelab/configs/compare-lm.yaml: dense, switch, hash, hash-balanced and top-2 MoE at equal active
# FLOPs, and local attention; same steps for all), print the results table and the report's path, and
# inspect the routing of the top-2 model on a line of code. Each variant prints its time and the time
# left as it ends (about 7 minutes in all on an idle 2-core CPU). Rerunning keeps finished variants and resumes an
# interrupted one; delete runs/compare-lm to start over. Extra arguments go to `routelab compare`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out="runs/compare-lm"
.venv/bin/routelab compare compare-lm --out "$out" "$@"
run="$out/top2"
if [ -d "$run/seed-0" ]; then run="$run/seed-0"; fi  # --seeds N: each seed's run in OUT/<variant>/seed-<s>/
.venv/bin/routelab inspect "$run" --text "def parse(self, text):" --out "$out/inspect-top2"
