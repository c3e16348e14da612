#!/usr/bin/env bash
# The paper-size ISBI 2012 runs on one GPU: every preset at 512², full-width models (Fig. 4 nets width 32,
# 5 levels; the Table 1 model itself), the paper's settings (Keras 1.x RMSprop lr 1e-3 rho 0.9, l2 weight
# decay 1e-3 on conv kernels, 25 train / 5 val images, flips/rotations/shear/elastic warp, best-validation
# weights). Not run yet: the session that wrote it had no GPU (see reports/isbi-gpu/README.md).
#
# With the device tool, from the repository root (the data travels in an ignored folder, never committed):
#   mkdir -p .isbi && cp -r ../shared/data/isbi2012/images ../shared/data/isbi2012/labels .isbi/ \
#     && echo /.isbi/ >> .git/info/exclude
#   run(command="bash reports/isbi-gpu/run.sh .isbi", carry=[".isbi"], timeout_s=600)
# Then unpack $OUT/isbi-gpu-reports.tar.gz at the repository root and commit reports/isbi-*-gpu/.
#
# Sizing (estimate, not measured): ~110 GFLOP per 512² image per training step (forward + backward, both
# nets), 7 steps per epoch, the per-step recorder and launch overhead of ~150 layers dominating; EPOCHS=40
# per variant aims at ~50 s per variant, 8 variants in ~7 min. Each preset runs under its own timeout; a
# sweep resumes per variant, so a preset cut short keeps its finished variants and its report shows the
# unfinished one as far as it got. walltimes.txt and the logs say how long each took, to size the next run.
set -uo pipefail
DATA=${1:-${GRADFLOW_ISBI:-../shared/data/isbi2012}}
EPOCHS=${EPOCHS:-40}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu EXTRA="--size 256 --crop 128 ..." checks the script itself on a CPU
EXTRA=${EXTRA:-}
OUT=${OUT:-/tmp/isbi-gpu-out}
STORES=${STORES:-/tmp/isbi-gpu-stores}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" COLUMNS=150
gradflow() { python -c 'import sys; from gradflow.cli import main; sys.argv[0] = "gradflow"; main()' "$@"; }

if [ "$DEVICE" = cuda ]; then
  python -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())' || exit 1
fi
mkdir -p "$OUT" "$STORES"
for spec in fig4:200 table3:170 table2:110; do
  preset=${spec%%:*} limit=${spec##*:}
  start=$(date +%s)
  timeout "$limit" gradflow sweep --preset "$preset" --data "$DATA" --device "$DEVICE" --epochs "$EPOCHS" $EXTRA \
    --out "$STORES/isbi-$preset-gpu.zarr" 2>&1 | tee "$OUT/$preset.log"
  echo "$preset rc=${PIPESTATUS[0]} wall_s=$(( $(date +%s) - start )) epochs=$EPOCHS" | tee -a "$OUT/walltimes.txt"
  gradflow report "$STORES/isbi-$preset-gpu.zarr" --out "reports/isbi-$preset-gpu"
  cp "$OUT/$preset.log" "reports/isbi-$preset-gpu/sweep.log"
done
cp "$OUT/walltimes.txt" reports/isbi-gpu/walltimes.txt
tar czf "$OUT/isbi-gpu-reports.tar.gz" reports/isbi-*-gpu reports/isbi-gpu/walltimes.txt
tar czf "$OUT/isbi-gpu-stores.tar.gz" -C "$STORES" .
ls -la "$OUT"
