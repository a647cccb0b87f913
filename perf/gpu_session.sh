#!/usr/bin/env bash
# One prepared GPU session for the fast fp16 path (issue 13): installs the packed server, then runs
# every stage of `python -m perf.gpu_session` in its own process, each under its own timeout, and
# leaves in $OUT: session.log, results.json, summary.md, perf_results.tgz (perf/results/<gpu>/ as
# `python -m perf` rendered it, raw CSVs included), server_logs.tgz, pytest_gpu.log.
#
# Needs, in the repository root (git-ignored, carried to the GPU machine):
#   .devpack/pack/            bash ../shared/tools/pack-triton-gpu.sh .devpack/pack isal
#   .devpack/perf_analyzer.xz xz -c .cache/perf_analyzer-2.51.0/bin/perf_analyzer > .devpack/perf_analyzer.xz
# and a python3 with torch (CUDA). Usage: OUT=/some/dir bash perf/gpu_session.sh [STAGE ...]
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/session.log") 2>&1
PY=${PY:-python3}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(forward served baseline reference write transfer)
declare -A LIMIT=([forward]=240 [served]=300 [baseline]=200 [reference]=200 [write]=90 [transfer]=60)

run_stage() {  # run_stage SECONDS CMD...: a hang costs its own limit, not the session
  local limit=$1; shift
  echo "=== $(date +%T) start (limit ${limit}s): $*"
  timeout --kill-after=15 "$limit" "$@"
  echo "=== $(date +%T) rc=$?: $*"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run_stage 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade .devpack/pack/wheels/*.whl
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$site/wholebody-repo.pth"  # the stub ignores PYTHONPATH; it reads the interpreter's site-packages
export WHOLEBODY_CACHE=/tmp/wbcache
server_dir=$WHOLEBODY_CACHE/tritonserver-2.51.0
mkdir -p "$server_dir" "$WHOLEBODY_CACHE/perf_analyzer-2.51.0/bin"
tar xJf .devpack/pack/triton-slim.tar.xz -C "$server_dir"
chmod +x "$server_dir"/pytriton/tritonserver/bin/* "$server_dir"/pytriton/tritonserver/backends/python/triton_python_backend_stub
xz -dc .devpack/perf_analyzer.xz > "$WHOLEBODY_CACHE/perf_analyzer-2.51.0/bin/perf_analyzer"
chmod +x "$WHOLEBODY_CACHE/perf_analyzer-2.51.0/bin/perf_analyzer"
"$PY" -c 'import torch, numpy, monai, tritonclient; print("torch", torch.__version__, "numpy", numpy.__version__, "cuda", torch.cuda.is_available())'

for stage in "${STAGES[@]}"; do
  run_stage "${LIMIT[$stage]:-120}" "$PY" -m perf.gpu_session --out "$OUT" "$stage"
done
run_stage 30 "$PY" -m perf.gpu_session --out "$OUT" summary
(cd "$OUT" && [ -d perf_results ] && tar czf perf_results.tgz perf_results && rm -rf perf_results)
(cd "$OUT" && ls tritonserver-*.log >/dev/null 2>&1 && tar czf server_logs.tgz tritonserver-*.log && rm -f tritonserver-*.log)
run_stage 150 "$PY" -m pytest tests/test_torch_network.py -q -p no:cacheprovider -k "gpu or GPU or compiled" \
  > "$OUT/pytest_gpu.log" 2>&1
tail -5 "$OUT/pytest_gpu.log"
echo "=== $(date +%T) session done"
