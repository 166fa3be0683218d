"""Run the GPU benchmarks in one process (one import of torch and the kernels).

    python -m benchmarks.run_all                          # GPU: each at its default size
    python -m benchmarks.run_all --tiny --device cpu      # CPU smoke run (Triton under the interpreter)

Arguments other than those below go to every benchmark (``--device``, ``--out``, ``--threads``,
``--cpu-runs``, ``--no-compile``, ``--warmup-ms``, ``--rep-ms``, ``--no-write``). A failing
benchmark does not stop the others; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="--preset tiny for every benchmark")
    p.add_argument("--only", default="optimizer,fake_quant,train_step,dequant_matmul",
                   help="comma list of benchmarks to run")
    p.add_argument("--optimizer-args", default="", help="extra arguments for bench_optimizer")
    p.add_argument("--fake-quant-args", default="", help="extra arguments for bench_fake_quant")
    p.add_argument("--train-step-args", default="", help="extra arguments for bench_train_step")
    p.add_argument("--dequant-matmul-args", default="", help="extra arguments for bench_dequant_matmul (GPU only)")
    args, common_args = p.parse_known_args(argv)

    # The kernels must see TRITON_INTERPRET before they are imported (CPU runs).
    device = "auto"
    for i, a in enumerate(common_args):
        if a == "--device" and i + 1 < len(common_args):
            device = common_args[i + 1]
        elif a.startswith("--device="):
            device = a.split("=", 1)[1]
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from . import bench_dequant_matmul, bench_fake_quant, bench_optimizer, bench_train_step

    benches = {
        "optimizer": (bench_optimizer, args.optimizer_args),
        "fake_quant": (bench_fake_quant, args.fake_quant_args),
        "train_step": (bench_train_step, args.train_step_args),
        "dequant_matmul": (bench_dequant_matmul, args.dequant_matmul_args),  # skips itself without CUDA
    }
    failed = []
    for name in [n for n in args.only.split(",") if n]:
        if name not in benches:
            p.error(f"unknown benchmark {name!r}; choose from {sorted(benches)}")
        module, extra = benches[name]
        argv_b = (["--preset", "tiny"] if args.tiny else []) + list(common_args) + shlex.split(extra)
        print(f"\n===== {name}: {' '.join(argv_b)}", flush=True)
        try:
            module.main(argv_b)
        except (Exception, SystemExit) as err:  # noqa: BLE001 - report and go on
            if isinstance(err, SystemExit) and not err.code:
                continue
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
