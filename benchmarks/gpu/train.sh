#!/usr/bin/env bash
# GPU check of issue 13, about 4 minutes on one GPU: bf16 training throughput of `paper` at 512²,
# then a 100-step `paper` run on a pyramidal TIFF whose model samples a 1024² slide.
#
#   benchmarks/gpu/train.sh            # on a CUDA machine; figures in $WORK/summary.json
#   benchmarks/gpu/train.sh --dry-run  # the same steps on the CPU at tiny sizes (a tiny net)
#
# Wheels it needs (a GPU machine may have no network: bring them): torch, numpy, accelerate,
# safetensors, typer, rich, tifffile, imagecodecs, zarr, numcodecs, pillow, matplotlib. It needs
# neither OpenSlide nor pyvips: the test slide is built from tests/data/cmu_small_region.svs
# with tifffile and read back through tifffile.
set -euo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python}
WORK=${WORK:-$(mktemp -d -t wsigen-gpu-train-XXXX)}
mkdir -p "$WORK"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" WSIGEN_NO_PROGRESS=1
wsigen() { "$PY" -c "from wsigen.cli import main; main()" "$@"; }

"$PY" - <<'EOF'
import importlib, sys
need = ["torch", "numpy", "accelerate", "safetensors", "typer", "rich", "tifffile", "imagecodecs",
        "zarr", "numcodecs", "PIL", "matplotlib"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"train.sh: missing Python packages: {' '.join(missing)} (install their wheels)")
EOF

if [[ $DRY == 1 ]]; then
  DEVICE=cpu PREC=fp32 SIDE=1024 STEPS=3 BATCH=2 SECONDS_T=3 SIZE=64 SAMPLE_STEPS=3
  echo '{"width": 8, "mults": [1, 2], "attn_levels": [1], "blocks": 1, "dropout": 0.1, "patch": 32}' > "$WORK/tiny.json"
  ARCH="$WORK/tiny.json"
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'train.sh: no CUDA device (use --dry-run)')"
  # TRAIN_STEPS / TRAIN_SECONDS shorten it where device time is short (run.sh's train section)
  DEVICE=cuda PREC=bf16 SIDE=8192 STEPS=${TRAIN_STEPS:-100} BATCH=8 SECONDS_T=${TRAIN_SECONDS:-30} SIZE=1024 SAMPLE_STEPS=20
  ARCH=paper
fi
echo "work dir $WORK; arch $ARCH on $DEVICE ($PREC)"

t0=$(date +%s)
# 1. throughput of full optimizer steps on in-memory batches (the model's figure, not the loader's)
"$PY" "$ROOT/benchmarks/train_throughput.py" --arch "$ARCH" --device "$DEVICE" --precision "$PREC" \
  --batch "$BATCH" --seconds "$SECONDS_T" --json | tee "$WORK/throughput.json"

# 2. the test slide: SIDE² JPEG-tiled pyramidal TIFF at 0.25 µm/px of real tissue (tifffile)
SLIDE=$("$PY" "$ROOT/benchmarks/loader.py" --build-only --side "$SIDE" --work "$WORK")

# 3. a short run through the real loop (loader workers, keyed patches, checkpoint)
t1=$(date +%s)
wsigen train "$SLIDE" -o "$WORK/model" --arch "$ARCH" --max-steps "$STEPS" --batch "$BATCH" \
  --device "$DEVICE" --precision "$PREC" --preview-every 0 --checkpoint-every "$STEPS" --overwrite
t2=$(date +%s)

# 4. the trained model samples a slide
wsigen sample --model "$WORK/model" -o "$WORK/slide.zarr" --size "$SIZE" --steps "$SAMPLE_STEPS" \
  --device "$DEVICE" --overwrite
t3=$(date +%s)

"$PY" - "$WORK" "$((t2 - t1))" "$((t3 - t2))" "$((t3 - t0))" "$STEPS" "$BATCH" <<'EOF'
import json, sys
from pathlib import Path
work, train_s, sample_s, total_s, steps, batch = sys.argv[1], *map(int, sys.argv[2:])
rows = [json.loads(v) for v in (Path(work) / "model" / "loss.jsonl").read_text().splitlines()]
out = {"throughput": json.loads((Path(work) / "throughput.json").read_text()),
       "train": {"steps": steps, "batch": batch, "wall_s": train_s,
                 "images_per_s_last": rows[-1]["images_per_s"], "data_wait_last": rows[-1]["data_wait"],
                 "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]},
       "sample_wall_s": sample_s, "total_wall_s": total_s}
(Path(work) / "summary.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out, indent=1))
EOF
