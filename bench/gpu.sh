#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, on a machine with one CUDA GPU: run from the repository root as
#   bench/gpu.sh [train] [captions] [blocks]        (default: all three)
# Packages the machine lacks can lie as wheels in .whl/ (installed into /tmp/site, nothing else touched).
# Each bench writes its JSON to $OUT (default /tmp/siclip-gpu) and prints its summary lines.
set -uo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/siclip-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, timm, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"
for bench in ${@:-train captions blocks}; do
  start=$(date +%s)
  timeout 400 python3 -m bench "$bench" --device cuda --json > "$OUT/$bench.json" 2> "$OUT/$bench.log"
  echo "== $bench: exit $? in $(( $(date +%s) - start )) s"
  grep -v "^[a-z_]* = \|^\[\|^$\|^#" "$OUT/$bench.log" | tail -8
  cat "$OUT/$bench.json"; echo
done
