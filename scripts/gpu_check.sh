#!/usr/bin/env bash
# GPU check: the CUDA tests, then the attention, MoE and training-step benchmarks in bf16, merged
# into one JSON (default benchmarks/results/gpu_check.json; first argument to change it).
#
#   bash scripts/gpu_check.sh [OUT.json]        # QUICK=1 for small sizes (a smoke run of the script)
#
# Uses the Python of .venv if present, else python3 (PYTHON=... to choose): its torch must be a
# CUDA build that sees a GPU. scripts/setup.sh installs a CPU torch and cannot fetch a CUDA one
# offline, so this script does not set up; it stops (exit 2) when torch has no CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu_check.json}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: $("$PY" -c 'import torch; print("torch", torch.__version__, "(cuda", torch.version.cuda, ")")' 2>&1)" \
       "sees no CUDA device; install a CUDA build of torch in this environment and run again." >&2
  exit 2
fi
"$PY" -c "import torch; print('gpu_check:', torch.__version__, torch.cuda.get_device_name(0))"

if [ "${QUICK:-0}" = 1 ]; then
  SIZES="4096 8192"; CASES="e64-top2"; STEP="--seq-len 2048 --batch 1 --d-model 256 --layers 2"
else
  SIZES="16384 32768 65536 131072"; CASES="e64-top2 e128-top4 e256-top8"; STEP="--seq-len 8192 --batch 4"
fi
status=0
run() {  # name, timeout (s), command...: record the exit status, keep going
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$rc" > "$WORK/$name.rc"
  [ "$rc" = 0 ] || status=1
}

run pytest_cuda 1800 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests -rs \
  --junitxml "$WORK/pytest_cuda.xml"
run attention 3600 "$PY" benchmarks/attention.py --device cuda --dtype bf16 --repeats 3 --sizes $SIZES \
  --kinds local strided fixed longformer bigbird kmeans moba block_topp --json "$WORK/attention.json"
run moe 1800 "$PY" benchmarks/moe_layer.py --device cuda --dtype bf16 --reps 5 --cases $CASES \
  --activations swiglu --out "$WORK/moe.json"
run train_step 1800 "$PY" benchmarks/gpu_step.py --device cuda $STEP --attention moba local --json "$WORK/train_step.json"

"$PY" - "$WORK" "$OUT" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch

work, out = Path(sys.argv[1]), Path(sys.argv[2])
load = lambda name: json.loads((work / name).read_text()) if (work / name).exists() else None  # noqa: E731
rc = {p.stem: int(p.read_text()) for p in work.glob("*.rc")}
tests = None
if (work / "pytest_cuda.xml").exists():
    root = ET.parse(work / "pytest_cuda.xml").getroot()
    s = root if root.tag == "testsuite" else root.find("testsuite")
    tests = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
attention, moe, step = load("attention.json"), load("moe.json"), load("train_step.json")
summary = {
    "attention_speedup_over_dense_sdpa": {
        f"{r['kind']}@{r['n']}": round(r["speedup"], 2) for r in attention or [] if r["kind"] != "dense"
    },
    "attention_backend": {r["kind"]: r.get("backend") for r in attention or []},
    "moe_ratio_to_dense_ffn": {
        f"{r['case']}-{r['activation']}": round(r["fused_ratio"], 3) for r in moe or []
    },
    "train_tokens_per_s": {f"{r['attention']}+{r['ffn']}": round(r["tokens_per_s"]) for r in step or []},
}
result = dict(
    device=torch.cuda.get_device_name(0),
    torch=torch.__version__,
    cuda=torch.version.cuda,
    exit_status=rc,
    pytest_cuda=tests,
    summary=summary,
    attention=attention,
    moe=moe,
    train_step=step,
)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(summary, indent=2))
print(f"wrote {out}")
PY
exit $status
