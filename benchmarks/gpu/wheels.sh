#!/usr/bin/env bash
# Fetch the wheels a GPU machine without network lacks for sampling (zarr 3 and its needs), for
# its Python (default 3.12, manylinux x86-64), into .whl/ at the repository root (git-ignored;
# name it in the device tool's `carry`). Versions follow requirements.lock. About 10 MB.
#
#   benchmarks/gpu/wheels.sh            # here, where PyPI is reachable
#   # there: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   #        export PYTHONPATH=/tmp/site:$PYTHONPATH        (run.sh does this itself)
#
# Sampling, plan and info need none of imagecodecs, pyvips, openslide, wsidicom, pydicom or
# matplotlib (tests/test_lazy_imports.py): exports and training from JPEG-tiled slides do, and
# train.sh needs imagecodecs (add it with WHEELS_EXTRA=imagecodecs, ~25 MB).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-"$ROOT/.venv/bin/python"}
PYVER=${PYVER:-3.12}
DEST="$ROOT/.whl"
pin() { grep -i "^$1==" "$ROOT/requirements.lock" | head -1; }
names=(zarr numcodecs donfig google-crc32c ${WHEELS_EXTRA:-})
specs=()
for n in "${names[@]}"; do
  s=$(pin "$n"); [[ -n "$s" ]] || { echo "wheels.sh: $n is not pinned in requirements.lock" >&2; exit 1; }
  specs+=("$s")
done
mkdir -p "$DEST"
plats=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64; do plats+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${plats[@]}" -d "$DEST" "${specs[@]}"
du -sh "$DEST"
ls "$DEST"
