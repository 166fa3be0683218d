#!/usr/bin/env bash
# Everything a GPU lease should measure, in one command (the device runs one command at a
# time, at most 10 minutes each; run the parts separately when that is too tight):
#   bash benchmarks/gpu_session.sh [kernels|bench|all|study]
# kernels: the kernel tests with CUDA tensors (compiled, not interpreted) and the
#          non-finite skip; bench: copy bandwidth, the fused optimizer, fake quantization,
#          the train step and the converted layer's matmul (python -m benchmarks.run_all),
#          results under benchmarks/results/.
# study:   one chunk of the paper-shaped accuracy study (sweep preset 30M-lease, quest/cage
#          pairs first) for STUDY_MINUTES (default 8) minutes. A fresh machine starts from the
#          finished cells committed in benchmarks/results/study-30M-lease/cells/ (checkpoints are
#          too large to bring back, so a cell cut by the limit would start over: --whole-cells
#          starts a cell only when the slowest finished one would still fit); the finished
#          cells and the report are copied to $OUT/study-30M-lease/ to be committed.
set -u
cd "$(dirname "$0")/.."
part=${1:-all}
python - <<'PY'
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
PY
status=0
if [ "$part" = kernels ] || [ "$part" = all ]; then
  timeout 480 python -m pytest -q -x -p no:cacheprovider tests/test_kernels_fake_quant.py tests/test_kernels_backward.py \
    tests/test_kernels_optim.py tests/test_nonfinite.py tests/test_rotation.py tests/test_kernels_dequant_matmul.py || status=1
fi
if [ "$part" = bench ] || [ "$part" = all ]; then
  timeout 540 python -m benchmarks.run_all || status=1
fi
if [ "$part" = study ]; then
  keep=benchmarks/results/study-30M-lease
  runs=runs/sweep-30M-lease
  mkdir -p "$runs"
  [ -d "$keep/cells" ] && cp -rn "$keep/cells/." "$runs/"
  timeout 590 python -m cage sweep --preset 30M-lease --time-limit "${STUDY_MINUTES:-8}" --whole-cells \
    --out "$runs" --results-dir "$runs/results" || status=1
  if [ -n "${OUT:-}" ]; then
    for d in "$runs"/*/; do
      [ -f "$d/metrics.json" ] || continue
      mkdir -p "$OUT/study-30M-lease/cells/$(basename "$d")"
      cp "$d"/cell.json "$d"/metrics.json "$d"/train_log.csv "$d"/train.log "$OUT/study-30M-lease/cells/$(basename "$d")/" 2>/dev/null
    done
    cp -r "$runs/results" "$OUT/study-30M-lease/" 2>/dev/null
  fi
fi
exit $status
