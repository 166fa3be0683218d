#!/usr/bin/env bash
# Everything a GPU lease should measure, in one command (the device runs one command at a
# time, at most 10 minutes each; run the parts separately when that is too tight):
#   bash benchmarks/gpu_session.sh [kernels|bench|all]
# kernels: the kernel tests with CUDA tensors (compiled, not interpreted) and the
#          non-finite skip; bench: copy bandwidth, the fused optimizer, fake quantization
#          and the train step (python -m benchmarks.run_all), results under benchmarks/results/.
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
    tests/test_kernels_optim.py tests/test_nonfinite.py tests/test_rotation.py || status=1
fi
if [ "$part" = bench ] || [ "$part" = all ]; then
  timeout 540 python -m benchmarks.run_all || status=1
fi
exit $status
