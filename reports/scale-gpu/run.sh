#!/usr/bin/env bash
# Issue 10's GPU checks, one prepared script for a lent GPU machine (one H200 here): the CUDA tests
# (recorder figures on CUDA for every bucket kind, the fused Triton kernels by default, no host
# syncs, FSDP2 over NCCL), the launches benchmark (ops per recorded step, step-time ratios: goal
# ≤ 1.02× on the Table 1 model at 512² and on GPT-2-small, fused against multi-tensor),
# the memory benchmark (goal ≤ 1.25× the parameters' bytes of device memory) and the training
# throughput benchmark. Each part runs under its own timeout, so one failure leaves the others.
#
# With the device tool, from the repository root (zarr, numcodecs, donfig, google-crc32c and xarray
# travel as wheels, downloaded here as in /work/.library/device/README.md into the ignored .whl/):
#   run(command="bash reports/scale-gpu/run.sh", carry=[".whl"], timeout_s=420)
# Then copy $OUT's reports into reports/ (bench_launches_cuda.md, bench_memory_cuda.md, ...).
set -uo pipefail
OUT=${OUT:-/tmp/scale-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD" COLUMNS=150
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc
  python3 -c 'import torch, zarr, xarray; print("torch", torch.__version__, "zarr", zarr.__version__, "xarray", xarray.__version__, torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/env.txt"
part() {  # part NAME LIMIT COMMAND...: run under a timeout, log to $OUT/run.log, note the exit status
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  echo "=== $name" | tee -a "$OUT/run.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/run.log"
  echo "=== $name rc=${PIPESTATUS[0]} wall_s=$(( $(date +%s) - start ))" | tee -a "$OUT/run.log"
}
part tests 100 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra --import-mode=importlib" \
  tests/test_recorder_cuda.py tests/test_recorder.py tests/test_train.py tests/models/test_fcn.py \
  tests/data/test_augment.py tests/test_recorder_fsdp.py -k "cuda or nccl"
# auto is the fused Triton kernels there (gradflow/fused_triton.py); foreach the multi-tensor fallback.
part launches 150 python3 -m gradflow.bench.launches --device cuda --models gpt2,table1,mlp \
  --strategies auto,foreach --steps 200 --gpt2-steps 40 --block 10 --profile-steps 2 \
  --note "lent H200 machine, one process at a time" --out "$OUT/bench_launches_cuda.md"
part memory 90 python3 -m gradflow.bench.memory --device cuda --repeats 2 \
  --note "lent H200 machine" --out "$OUT/bench_memory_cuda.md"
part profile 40 python3 reports/scale-gpu/profile_step.py --device cuda --steps 60
part train 70 python3 -m gradflow.bench.train --device cuda --reps 2 --epochs 3 --n-train 200 \
  --note "lent H200 machine" --out "$OUT/bench_train_cuda.md"
ls -la "$OUT"
