#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md ("On a GPU") on a machine with one CUDA GPU whose python3 already has torch,
# torchvision, timm, transformers, accelerate, pyarrow and safetensors (a lent machine's image): run from the
# repository root as
#   bench/gpu.sh [ARGS for python -m bench gpu]          e.g. bench/gpu.sh --parts step,levers
# What that python lacks (dask, open_clip_torch, webdataset, pydantic, ftfy, ...) comes as wheels in .whl/
# (`make gpu-wheels`, here; carried there), installed into /tmp/site and nothing else touched.
# Writes $OUT/gpu.json (the record) and $OUT/gpu.log (progress); ends well inside 10 minutes on an H100.
set -uo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/siclip-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, timm, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'timm', timm.__version__, 'transformers', transformers.__version__, 'cores', __import__('os').cpu_count())"
start=$(date +%s)
timeout 560 python3 -m bench gpu --device cuda --json --partial "$OUT/gpu-partial.json" "$@" > "$OUT/gpu.json" 2> >(tee "$OUT/gpu.log" | grep "^bench gpu" >&2)
status=$?
echo "== bench gpu: exit $status in $(( $(date +%s) - start )) s"
python3 - "$OUT/gpu.json" <<'PY'
import json, sys
try:
    record = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except (OSError, ValueError, IndexError) as e:
    sys.exit(f"no record in {sys.argv[1]}: {e}")
print("ratios:", json.dumps(record["ratio"]))
for part in ("step", "loader", "levers"):
    print(part + ":", json.dumps(record["figures"].get(part)))
PY
exit $status
