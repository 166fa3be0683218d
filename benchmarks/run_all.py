"""Run the GPU benchmarks in one process (one import of torch and the kernels).

    python -m benchmarks.run_all                          # GPU: each at its default size
    python -m benchmarks.run_all --tiny --device cpu      # CPU smoke run (Triton under the interpreter)
    python -m benchmarks.run_all --only optimizer,host --out /tmp/results

Arguments other than those below go to every benchmark (``--device``, ``--threads``,
``--cpu-runs``, ``--no-compile``, ``--warmup-ms``, ``--rep-ms``, ``--no-write``,
``--time-budget-s``, ``--compile-budget-s``, ``--host-calls``, ``--no-graph``). Result files go
to ``--out`` (default ``benchmarks/results``), with ``run_all-summary.json``: each benchmark's
status, seconds and files. A failing benchmark does not stop the others; the exit status is 1
if any failed. ``host`` (``benchmarks.bench_host``) reports its goals in the summary; a missed
goal is a finding, not a failure of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

NAMES = ("optimizer", "fake_quant", "train_step", "dequant_matmul", "int8_linear", "host")
# --tiny: each benchmark's smallest preset that runs (bench_host's "tiny" activations, 64
# columns, are not whole Hadamard blocks of 128; its "small" takes seconds with launches stubbed)
TINY_PRESETS = {"host": "small"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="--preset tiny for every benchmark (bench_host: small)")
    p.add_argument("--only", default=",".join(NAMES), help=f"comma list of benchmarks to run (default: {','.join(NAMES)})")
    p.add_argument("--out", default=None, help="folder for every result file (default benchmarks/results)")
    p.add_argument("--optimizer-args", default="", help="extra arguments for bench_optimizer")
    p.add_argument("--fake-quant-args", default="", help="extra arguments for bench_fake_quant")
    p.add_argument("--train-step-args", default="", help="extra arguments for bench_train_step")
    p.add_argument("--dequant-matmul-args", default="", help="extra arguments for bench_dequant_matmul (GPU only)")
    p.add_argument("--int8-linear-args", default="", help="extra arguments for bench_int8_linear")
    p.add_argument("--host-args", default="", help="extra arguments for bench_host (e.g. '--calls 50')")
    args, common_args = p.parse_known_args(argv)
    names = [n for n in args.only.split(",") if n]
    for name in names:
        if name not in NAMES:
            p.error(f"unknown benchmark {name!r}; choose from {sorted(NAMES)}")

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

    from . import (bench_dequant_matmul, bench_fake_quant, bench_host, bench_int8_linear, bench_optimizer,
                   bench_train_step, common)

    benches = {
        "optimizer": (bench_optimizer, args.optimizer_args),
        "fake_quant": (bench_fake_quant, args.fake_quant_args),
        "train_step": (bench_train_step, args.train_step_args),
        "dequant_matmul": (bench_dequant_matmul, args.dequant_matmul_args),  # skips itself without CUDA
        "int8_linear": (bench_int8_linear, args.int8_linear_args),
        "host": (bench_host, args.host_args),  # launches stubbed: host time only
    }
    out_dir = Path(args.out) if args.out is not None else common.RESULTS_DIR
    out_args = ["--out", str(out_dir)]
    write = "--no-write" not in common_args
    failed = []
    summary = []
    for name in names:
        module, extra = benches[name]
        tiny = ["--preset", TINY_PRESETS.get(name, "tiny")] if args.tiny else []
        argv_b = tiny + list(common_args) + out_args + shlex.split(extra)
        print(f"\n===== {name}: {' '.join(argv_b)}", flush=True)
        entry = {"benchmark": name, "argv": argv_b}
        t0 = time.monotonic()
        try:
            result = module.main(argv_b)
            entry["status"] = "skipped: " + result["skipped"] if isinstance(result, dict) and "skipped" in result else "ok"
            if isinstance(result, dict):
                entry["files"] = result.get("paths", [])
                if "goals" in result:
                    entry["goals"] = result["goals"]
        except (Exception, SystemExit) as err:  # noqa: BLE001 - report and go on
            if isinstance(err, SystemExit) and not err.code:
                entry["status"] = "ok"
            else:
                traceback.print_exc()
                failed.append(name)
                entry["status"] = "error: " + common.short_error(err)
        entry["seconds"] = round(time.monotonic() - t0, 1)
        summary.append(entry)
        print(f"===== {name}: {entry['status']} in {entry['seconds']} s", flush=True)
        if write:  # after every benchmark: a run cut short keeps what finished
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "run_all-summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    missed = [g["goal"] for e in summary for g in e.get("goals", []) if g.get("status") != "met"]
    if missed:
        print("\nhost goals missed: " + "; ".join(missed), file=sys.stderr)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
