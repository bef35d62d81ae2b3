#!/bin/bash
# bench/serve_load.py on an accelerator machine that has PyTorch but no package index:
# the quickstart detector behind a GPU replica and behind a CPU replica on the same host
# (`small`), or ResNet-18 (width 64) on both (`resnet18`), each replica held to one core;
# every front end, one JSON and one log per run in OUT_DIR.
#
# Here:   .venv/bin/python bench/offline_site.py --out .devsite/site.tar.xz
# There:  bash bench/serve_gpu.sh OUT_DIR [small|resnet18]     (SITE=... to move the archive)
set -u
OUT_DIR=${1:?usage: bench/serve_gpu.sh OUT_DIR [small|resnet18]}
cd "$(dirname "$0")/.."
T0=$(date +%s)
mkdir -p /tmp/site "$OUT_DIR" && tar -xJf "${SITE:-.devsite/site.tar.xz}" -C /tmp/site || exit 3
export PYTHONPATH=/tmp/site:$PWD/platform PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 \
  MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=60
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "$(nproc) CPUs; $(uptime)"
python3 -c "import torch, ray, mlflow; from ray import serve; import oodlab.serve.app; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__, \
'mlflow', mlflow.__version__)" || exit 4
echo "set-up $(( $(date +%s) - T0 )) s"

stop_ray() { pkill -9 -f haproxy; pkill -9 -f 'ray::'; pkill -9 -f raylet; pkill -9 -f gcs_server
             sleep 1; }
run() {  # NAME SECONDS ARGS...: one bench run under a time limit, its headline lines echoed
  local name=$1 secs=$2; shift 2
  echo "=== $name at $(( $(date +%s) - T0 )) s"
  timeout "$secs" python3 bench/serve_load.py "$@" --out "$OUT_DIR/$name.json" \
    >"$OUT_DIR/$name.log" 2>&1
  echo "exit $?"
  grep -E "^raw|^replica alone|^\[|Error" "$OUT_DIR/$name.log" | grep -v graceful_shutdown
  stop_ray  # a run stopped by its limit leaves Ray behind
}
PIN="--pin-replica-core 1"  # each replica held to one core; client, Ray, front on the rest
case "${2:-small}" in
small)
  BENCH_PORT=8765 run serve_load_gpu 270 --replica-gpus 1 $PIN --requests 300 \
    --images-per-request 1 8
  BENCH_PORT=8766 run serve_load_cpu_same_host 270 $PIN --requests 300 \
    --images-per-request 1 8 ;;
resnet18)
  BENCH_PORT=8767 run serve_load_gpu_resnet18 120 --arch resnet18 --width 64 --replica-gpus 1 \
    $PIN --requests 200 --images-per-request 8 32
  BENCH_PORT=8768 run serve_load_cpu_resnet18 120 --arch resnet18 --width 64 $PIN \
    --ingress haproxy --requests 60 --images-per-request 8 ;;
*) echo "unknown set: $2 (small or resnet18)"; exit 2 ;;
esac
echo "total $(( $(date +%s) - T0 )) s"
