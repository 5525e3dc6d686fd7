#!/usr/bin/env bash
# The main job: set up, then compare routing variants of a small LM on the Python standard library's
# source (routelab/configs/compare-lm.yaml: dense, top-2 MoE at equal active FLOPs and local attention,
# three seeds each), print the results table with 95% intervals, paired differences to dense and
# verdicts, and the report's path, and inspect the routing of the top-2 model (seed 0) on a line of
# code. Each run prints its time and the time left as it ends. Rerunning keeps finished runs and
# resumes an interrupted one; delete runs/compare-lm to start over. Extra arguments go to `routelab compare`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out="runs/compare-lm"
.venv/bin/routelab compare compare-lm --out "$out" "$@"
run="$out/top2"
if [ -d "$run/seed-0" ]; then run="$run/seed-0"; fi  # over seeds, each run is OUT/<variant>/seed-<s>/ (--seeds 1: OUT/<variant>/)
.venv/bin/routelab inspect "$run" --text "def parse(self, text):" --out "$out/inspect-top2"
