#!/usr/bin/env bash
# Issue 19: every single-GPU CUDA path once, with throughput and real figures for `plan`.
#
#   benchmarks/gpu/run.sh                    # all sections on a CUDA machine (≈ 5–7 min on one H200)
#   benchmarks/gpu/run.sh sample plan        # some sections alone (a rerun fits what time is left)
#   benchmarks/gpu/run.sh --dry-run          # every section on the CPU at tiny sizes (same code)
#
# Sections, in order: env, tests (pytest -m cuda), throughput (512²: default and the 36.3-GFLOP
# UNet, fp32/bf16, eager/channels-last, compiled once per net in bf16), sample (a real 8192² slide
# of the 36.3-GFLOP UNet in bf16 beside its plan), plan (65536² on 4 GPUs at the measured rate: a
# model), train (benchmarks/gpu/train.sh, shortened). Each writes $OUT/<section>.json as soon as it
# ends (what was written comes back even if the run is cut off); $OUT/sections.json says how each
# went. A failing section does not stop the others; the exit status is 1 if any failed.
#
# A GPU machine may lack zarr and its needs and have no network: benchmarks/gpu/wheels.sh fetches
# them into .whl/ here; this script installs them into /tmp/wsigen-site there when zarr is missing.
set -uo pipefail

DRY=0
SECTIONS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    env|tests|throughput|sample|plan|train) SECTIONS+=("$a") ;;
    *) echo "run.sh: unknown argument $a (sections: env tests throughput sample plan train)" >&2; exit 2 ;;
  esac
done
[[ ${#SECTIONS[@]} -gt 0 ]] || SECTIONS=(env tests throughput sample plan train)

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
[[ -x "$ROOT/.venv/bin/python" && -z "${PYTHON:-}" ]] && PY="$ROOT/.venv/bin/python"
WORK=${WORK:-$(mktemp -d -t wsigen-gpu-XXXX)}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
if ! "$PY" -c "import zarr" 2>/dev/null; then
  if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/wsigen-site "$ROOT"/.whl/*.whl || exit 1
    export PYTHONPATH="/tmp/wsigen-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "run.sh: zarr is missing and there is no .whl/ (run benchmarks/gpu/wheels.sh where pip works)" >&2
    exit 1
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" WSIGEN_NO_PROGRESS=1 PYTHONUNBUFFERED=1
wsigen() { "$PY" -c "from wsigen.cli import main; main()" "$@"; }

if [[ $DRY == 1 ]]; then
  DEVICE=cpu PREC=fp32 PATCH=64 SIZE=256 TP_BATCHES=2 TP_SECONDS=0.3 CBATCH=2 STEPS_ARG=(--steps 4)
  export WSIGEN_CUDA_DRY=1 WSIGEN_COMPILE_BACKEND=eager
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'run.sh: no CUDA device (use --dry-run)')" || exit 1
  DEVICE=cuda PREC=bf16 PATCH=512 SIZE=8192 TP_BATCHES=8,32 TP_SECONDS=2 CBATCH=32 STEPS_ARG=()
fi
MODEL="$WORK/unet-36gflop.safetensors"   # width 12, mults 1-2-4-4, attention at 1/8: 36.3 GFLOP at 512²
echo "run.sh: sections ${SECTIONS[*]} on $DEVICE; work $WORK; results $OUT"

env_section() {
  "$PY" - "$OUT/env.json" <<'PYEOF'
import json, platform, sys
import numpy, torch
d = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
     "cudnn": torch.backends.cudnn.version(), "numpy": numpy.__version__, "platform": platform.platform()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(gpu=p.name, gpu_memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
             bf16=torch.cuda.is_bf16_supported())
import zarr
d["zarr"] = zarr.__version__
open(sys.argv[1], "w").write(json.dumps(d, indent=2))
print(json.dumps(d))
PYEOF
}

tests_section() {
  "$PY" -m pytest -q -m cuda -p no:cacheprovider -o addopts="" "$ROOT/tests/test_cuda.py" -rA \
    --junitxml="$WORK/cuda.xml" -s
  local rc=$?
  "$PY" - "$WORK/cuda.xml" "$OUT/tests.json" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
cases = []
for c in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    state = "failed" if c.find("failure") is not None or c.find("error") is not None else (
        "skipped" if c.find("skipped") is not None else "passed")
    out = (c.findtext("system-out") or "").strip().splitlines()
    cases.append({"test": c.get("name"), "state": state, "seconds": float(c.get("time", 0)), "printed": out[-3:]})
json.dump({"cases": cases, "passed": sum(c["state"] == "passed" for c in cases),
           "failed": sum(c["state"] == "failed" for c in cases)}, open(sys.argv[2], "w"), indent=2)
PYEOF
  return $rc
}

throughput_section() {
  "$PY" "$ROOT/benchmarks/throughput.py" --patch "$PATCH" --batches "$TP_BATCHES" --precisions fp32,bf16 \
    --variants eager,channels-last,compile --compile-batch "$CBATCH" --compile-precisions bf16 \
    --seconds "$TP_SECONDS" --out "$OUT/throughput.json"
}

make_model() {
  [[ -f "$MODEL" ]] || wsigen model init -o "$MODEL" --width 12 --mults 1,2,4,4 --attn 3 --blocks 1 \
    --patch "$PATCH" --final-mpp 0.5 --recommended-size "$SIZE" --mpp-min 0.25 --mpp-max 256 > /dev/null
}

sample_section() {
  make_model || return 1
  "$PY" "$ROOT/benchmarks/gpu/sample.py" --model "$MODEL" --size "$SIZE" --mpp 0.5 --precision "$PREC" \
    --device "$DEVICE" --batch 16 "${STEPS_ARG[@]}" --out "$OUT/sample.json"
}

plan_section() {
  make_model || return 1
  local x=${THROUGHPUT:-}
  if [[ -z "$x" && -f "$OUT/sample.json" ]]; then
    x=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['evaluations_per_s'])" "$OUT/sample.json")
  fi
  [[ -n "$x" ]] || { echo "plan: no measured throughput (run the sample section, or set THROUGHPUT)" >&2; return 1; }
  wsigen plan --size 65536 --gpus 4 --model "$MODEL" --mpp 0.5 --batch 16 --throughput "$x" || return 1
  "$PY" - "$MODEL" "$x" "$OUT/plan.json" <<'PYEOF'
import json, sys
import wsigen
model, rate, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
rows = {p: wsigen.plan(65536, model=model, mpp=0.5, batch=16, world=4, throughput=rate, preset=p)
        for p in ("paper", "fast")}
for p, r in rows.items():
    print(f"65536² on 4 GPUs, preset {p}: {r['evaluations']:,} evaluations, "
          f"{r['estimated_seconds'] / 3600:.2f} h at {rate:,.1f} evaluations/s per GPU (a model)")
json.dump({"throughput_per_gpu": rate, "gpus": 4, "note": "a model: one GPU's measured rate; NCCL not run",
           **rows}, open(out, "w"), indent=1)
PYEOF
}

train_section() {
  local args=()
  [[ $DRY == 1 ]] && args=(--dry-run)
  WORK="$WORK/train" TRAIN_STEPS=${TRAIN_STEPS:-40} TRAIN_SECONDS=${TRAIN_SECONDS:-15} PYTHON="$PY" \
    bash "$ROOT/benchmarks/gpu/train.sh" "${args[@]}" && cp "$WORK/train/summary.json" "$OUT/train.json"
}

status=0
echo "[]" > "$OUT/sections.json"
for s in "${SECTIONS[@]}"; do
  echo "=== $s"
  t0=$(date +%s)
  "${s}_section"
  rc=$?
  t1=$(date +%s)
  [[ $rc == 0 ]] || status=1
  "$PY" - "$OUT/sections.json" "$s" "$rc" "$t0" "$t1" <<'PYEOF'
import json, sys
path, name, rc, t0, t1 = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
rows = json.load(open(path))
rows.append({"section": name, "rc": rc, "seconds": round(t1 - t0, 1)})
json.dump(rows, open(path, "w"), indent=1)
PYEOF
  echo "=== $s: rc $rc in $((t1 - t0)) s"
done
cat "$OUT/sections.json"
exit $status
