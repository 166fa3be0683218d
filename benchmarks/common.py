"""Shared pieces of the benchmarks: environment record, timers, byte counts, result files.

Conventions (SPEC 4):

- every speed is reported as GB/s from *counted* bytes (the minimum traffic of the job, written
  out as a formula next to each benchmark), next to the copy bandwidth measured on the same
  device in the same run;
- ratios are time ratios ``t(row) / t(baseline)`` against baselines measured in the same run
  (below 1 means the row is faster than the baseline);
- on a GPU, times come from ``triton.testing.do_bench`` (median, warm-up, L2 flushed between
  calls); without CUDA a plain ``perf_counter`` timer stands in and every result is labelled
  as a CPU (and, for Triton rows, interpreter) number, never as a GPU result;
- host time and device time apart (CUDA): do_bench's figure is what a caller gets, the larger
  of the Python before the launches and the kernels (the GPU waits while the host plans);
  ``host_time`` is the host's part alone (a call's wall time with the GPU idle when it starts,
  not waiting for its kernels) and ``graph_bench`` the kernels' alone (the call captured in a
  CUDA graph and replayed, ``triton.testing.do_bench_cudagraph``), for calls that can be captured;
- budgets: ``--time-budget-s`` stops a benchmark from starting new rows (the rows it did not
  run say so, and the result files are written), ``--compile-budget-s`` caps the seconds its
  ``torch.compile`` baselines may take together (a compile under way is not cut).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import inspect
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

GB = 1e9  # GB/s are decimal: bytes / 1e9 per second

# Copy bandwidth of an H100 80GB HBM3 as one earlier run on a lent machine measured it
# (device-to-device copy, bytes read + written; /work/.library/device/KINDS.md). Only for
# predictions in NOTES.md: every GPU run measures its own.
H100_COPY_GBPS_REFERENCE = 3000.0


# ---------------------------------------------------------------------------------------
# device and environment


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return dev


def ensure_interpreter_for(device: torch.device) -> bool:
    """On a CPU device the Triton kernels can only run under Triton's interpreter, which must be
    switched on before the modules that define kernels are imported. Returns whether it is on."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        if "cage_kernels" in sys.modules:
            print(
                "warning: cage_kernels was imported before TRITON_INTERPRET=1 was set; "
                "Triton rows may fail on the CPU",
                file=sys.stderr,
            )
        os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:  # noqa: BLE001 - a missing optional package is recorded, not raised
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or None
    except Exception:  # noqa: BLE001
        return None


def environment(device: torch.device) -> dict:
    """What ran where: device, versions, date, command line. Stored with every result."""
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": interp,
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_bytes=getattr(props, "L2_cache_size", None),
            capability=f"{props.major}.{props.minor}",
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            timer="triton.testing.do_bench (CUDA events, L2 flushed between calls)",
            gpu_result=True,
        )
    else:
        env.update(
            device_name=f"CPU: {env['cpu']} ({env['cpu_count']} cores)",
            timer="time.perf_counter median (CPU fallback timer)",
            gpu_result=False,
        )
    return env


def device_slug(env: dict) -> str:
    """Short file-name part: ``nvidia-h100-80gb-hbm3``, ``cpu``, ``cpu-interpreter``."""
    if env["device_type"] == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")
    return "cpu-interpreter" if env.get("triton_interpret") else "cpu"


def result_label(env: dict) -> str:
    """One line that says what kind of numbers these are."""
    if env.get("gpu_result"):
        return f"GPU results on {env['device_name']}"
    interp = " with Triton rows under TRITON_INTERPRET=1 (the interpreter)" if env.get("triton_interpret") else ""
    return (
        f"CPU run{interp} on {env['device_name']}: NOT GPU results; they check that the "
        "benchmark runs and say nothing about GPU speed"
    )


# ---------------------------------------------------------------------------------------
# timing


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int | None = None
    host_ms: float | None = None  # time_steps on CUDA: median of the host's part of each call

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _do_bench_gpu(fn: Callable[[], object], warmup_ms: float, rep_ms: float, do_bench=None) -> Timing:
    """``triton.testing.do_bench`` across Triton versions: quantiles where accepted (3.x), else
    ``return_mode="median"``, else the plain call (then the figure is whatever it returns)."""
    if do_bench is None:
        from triton.testing import do_bench

    return _call_bench(do_bench, fn, warmup_ms, rep_ms)


def _call_bench(do_bench, fn: Callable[[], object], warmup_ms: float | None, rep_ms: float) -> Timing:
    """One of Triton's timers (``do_bench``, ``do_bench_cudagraph``) called with the arguments
    its signature takes: median and 20/80 percentiles where it takes ``quantiles``."""
    params = inspect.signature(do_bench).parameters
    kwargs = {}
    if "warmup" in params and warmup_ms is not None:
        kwargs["warmup"] = max(1, int(round(warmup_ms)))
    if "rep" in params:
        kwargs["rep"] = max(1, int(round(rep_ms)))
    if "quantiles" in params:
        out = do_bench(fn, quantiles=[0.5, 0.2, 0.8], **kwargs)
        if isinstance(out, (list, tuple)) and len(out) == 3:
            return Timing(float(out[0]), float(out[1]), float(out[2]))
        med = float(out[0] if isinstance(out, (list, tuple)) else out)
        return Timing(med, med, med)
    if "return_mode" in params:
        med = float(do_bench(fn, return_mode="median", **kwargs))
    else:
        med = float(do_bench(fn, **kwargs))
    return Timing(med, med, med)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _cpu_bench(fn: Callable[[], object], warmup_ms: float, rep_ms: float, min_runs: int = 2, max_runs: int = 100) -> Timing:
    """Median wall time of single calls: one warm-up call (plus more up to ``warmup_ms``), then
    timed calls until ``rep_ms`` is spent (at least ``min_runs``)."""
    t0 = time.perf_counter()
    fn()
    while (time.perf_counter() - t0) * 1e3 < warmup_ms:
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or ((time.perf_counter() - start) * 1e3 < rep_ms and len(times) < max_runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


# Least number of timed calls of the CPU timer (``--cpu-runs``; tests use 1 to stay fast).
CPU_MIN_RUNS = 3


def bench(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """Median time of ``fn()`` in ms: ``do_bench`` on CUDA, the CPU timer elsewhere."""
    if device.type == "cuda":
        return _do_bench_gpu(fn, warmup_ms, rep_ms)
    return _cpu_bench(fn, warmup_ms, rep_ms, min_runs=CPU_MIN_RUNS)


def time_steps(step: Callable[[], object], device: torch.device, warmup: int, steps: int) -> Timing:
    """Median of ``steps`` timed calls after ``warmup`` calls, synchronizing around each call
    (for long calls such as a whole training step, where do_bench's L2 flush is pointless).
    On CUDA also the host's part (``host_ms``): the wall time until ``step`` returns, which
    starts with the GPU idle and does not wait for the kernels it queued."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times, host = [], []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t = time.perf_counter()
            start.record()
            step()
            end.record()
            host.append((time.perf_counter() - t) * 1e3)
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times),
                  host_ms=statistics.median(host) if host else None)


# ---------------------------------------------------------------------------------------
# host time and device time apart


def host_time(fn: Callable[[], object], device: torch.device, calls: int = 20,
              max_ms: float = 1000.0) -> Timing | None:
    """The host's part of a call on CUDA: wall time from the call to its return, with the GPU
    idle (synchronized) when it starts, so that a full launch queue never blocks it and the
    kernels it queued are not waited for. ``calls`` calls, fewer (at least 3) once ``max_ms``
    of wall time is spent. None off CUDA, where all of a call is host time."""
    if device.type != "cuda" or calls <= 0:
        return None
    times = []
    start = time.perf_counter()
    for _ in range(calls):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        if len(times) >= 3 and (time.perf_counter() - start) * 1e3 > max_ms:
            break
    torch.cuda.synchronize(device)
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


def graph_bench(fn: Callable[[], object], device: torch.device, rep_ms: float,
                do_bench_cudagraph=None) -> tuple[Timing | None, str]:
    """The kernels' part of a call on CUDA: ``triton.testing.do_bench_cudagraph`` (the call
    captured in a CUDA graph, replayed; no host work between kernels, no L2 flush). Returns
    ``(timing, how)``; ``(None, why)`` off CUDA, without that timer, or when the call cannot be
    captured (a host read, a host-to-device copy, torch's non-capturable optimizers)."""
    if device.type != "cuda":
        return None, "no CUDA"
    if do_bench_cudagraph is None:
        try:
            from triton.testing import do_bench_cudagraph
        except ImportError:
            return None, "this Triton has no do_bench_cudagraph"
    try:
        t = _call_bench(do_bench_cudagraph, fn, None, max(rep_ms, 20.0))
    except Exception as err:  # noqa: BLE001 - a call that cannot be captured is recorded, not raised
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001
            pass
        return None, "not captured: " + short_error(err, 120)
    return t, "do_bench_cudagraph"


def split_times(row: dict, fn: Callable[[], object], device: torch.device, args, rep_ms: float,
                capturable: bool, why_not: str = "not capturable") -> None:
    """Add ``host_ms`` (the host's part) and ``graph_ms`` (the kernels', when ``capturable``) to
    ``row`` on CUDA; off CUDA both stay absent (all of a CPU call is host time)."""
    if device.type != "cuda":
        return
    h = host_time(fn, device, getattr(args, "host_calls", 20))
    if h is not None:
        row.update(host_ms=h.median_ms, host_p20_ms=h.p20_ms, host_p80_ms=h.p80_ms)
    if getattr(args, "no_graph", False):
        row["graph"] = "not timed (--no-graph)"
    elif not capturable:
        row["graph"] = why_not
    else:
        g, how = graph_bench(fn, device, min(max(rep_ms, 20.0), 50.0))  # one graph of ~50 ms, replayed 10 times
        row["graph"] = how
        if g is not None:
            row.update(graph_ms=g.median_ms, graph_p20_ms=g.p20_ms, graph_p80_ms=g.p80_ms)
    if "host_ms" in row and "graph_ms" in row:
        row["host_bound"] = row["host_ms"] >= row["graph_ms"]


# ---------------------------------------------------------------------------------------
# time budgets

_BUDGET = {"deadline": None, "seconds": None, "compile_left": None, "compile_seconds": None}


def set_budgets(time_budget_s: float | None = None, compile_budget_s: float | None = None) -> None:
    """Start the benchmark's clock (``--time-budget-s``) and its compile allowance."""
    _BUDGET["seconds"] = time_budget_s
    _BUDGET["deadline"] = None if time_budget_s is None else time.monotonic() + time_budget_s
    _BUDGET["compile_seconds"] = compile_budget_s
    _BUDGET["compile_left"] = compile_budget_s


def over_budget() -> str | None:
    """Why a new row must not start (the time budget is spent), else None."""
    if _BUDGET["deadline"] is not None and time.monotonic() >= _BUDGET["deadline"]:
        return f"skipped: time budget spent (--time-budget-s {_BUDGET['seconds']:g})"
    return None


def compile_refused() -> str | None:
    """Why a torch.compile row must not start (either budget spent), else None."""
    if _BUDGET["compile_left"] is not None and _BUDGET["compile_left"] <= 0:
        return f"skipped: compile budget spent (--compile-budget-s {_BUDGET['compile_seconds']:g})"
    return over_budget()


def spend_compile(seconds: float) -> None:
    if _BUDGET["compile_left"] is not None:
        _BUDGET["compile_left"] -= seconds


# ---------------------------------------------------------------------------------------
# inputs larger than L2


def l2_bytes(device: torch.device) -> int:
    """The device's L2 size (50 MB on an H100 if torch does not say); 32 MiB stands in on a CPU."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    return 32 * 2**20


class Rotating:
    """A cycle of pre-built input sets, together larger than ``factor`` x L2, so that a timed call
    never finds its inputs in cache from the previous call. Built once, outside the timed region;
    ``next()`` only advances an index (no clone, no allocation)."""

    def __init__(self, make: Callable[[int], object], bytes_per_set: int, device: torch.device,
                 factor: float = 4.0, min_sets: int = 2, max_sets: int = 64, max_total_bytes: int | None = None):
        want = math.ceil(factor * l2_bytes(device) / max(1, bytes_per_set))
        n = max(min_sets, min(max_sets, want))
        if device.type != "cuda":
            n = min_sets  # CPU smoke runs: cache effects are not what they measure
        if max_total_bytes is not None:
            n = max(1, min(n, max_total_bytes // max(1, bytes_per_set)))
        self.sets = [make(i) for i in range(n)]
        self.bytes_per_set = bytes_per_set
        self._i = 0

    def __len__(self) -> int:
        return len(self.sets)

    @property
    def total_bytes(self) -> int:
        return len(self.sets) * self.bytes_per_set

    def next(self):
        s = self.sets[self._i]
        self._i = (self._i + 1) % len(self.sets)
        return s


# ---------------------------------------------------------------------------------------
# byte counts (SPEC 4)


def adamw_bytes_per_param(param_bytes: int, grad_bytes: int, state_bytes: int) -> int:
    """Minimum traffic of one AdamW step per parameter: read param, grad, exp_avg, exp_avg_sq;
    write param, exp_avg, exp_avg_sq. fp32 everything: 4+4+4+4 read + 4+4+4 written = 28."""
    return 2 * param_bytes + grad_bytes + 4 * state_bytes


def fake_quant_forward_bytes(rows: int, cols: int, in_bytes: int, out_bytes: int) -> int:
    """Read x, write Q(x), write the straight-through mask bit-packed (ceil(cols / 8) bytes a row)."""
    return rows * cols * (in_bytes + out_bytes) + rows * ((cols + 7) // 8)


def fake_quant_backward_bytes(rows: int, cols: int, grad_bytes: int) -> int:
    """Read the incoming gradient and the bit-packed mask, write the gradient."""
    return rows * cols * 2 * grad_bytes + rows * ((cols + 7) // 8)


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / GB


def copy_bandwidth(device: torch.device, nbytes: int | None = None, warmup_ms: float = 25, rep_ms: float = 100) -> dict:
    """Device-to-device copy of one large buffer; counted bytes = read + written = 2 x size.

    The buffer defaults to 1 GiB on a GPU (far larger than L2) and 64 MiB on a CPU."""
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 64 * 2**20
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, warmup_ms, rep_ms)
    counted = 2 * n * 4
    out = {"buffer_bytes": n * 4, "bytes": counted, "ms": t.median_ms, "gbps": gbps(counted, t.median_ms)}
    del src, dst
    return out


# ---------------------------------------------------------------------------------------
# result files


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.3g}" if a < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def markdown_table(rows: Iterable[dict], columns: Sequence[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs. Missing keys print as ``-``."""
    rows = list(rows)
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_results(name: str, env: dict, sections: list[dict], out_dir: str | Path | None = None,
                  extra: dict | None = None, notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>-<device-slug>.json`` and ``.md``; return both paths.

    ``sections``: dicts with ``title``, ``rows`` (list of dicts), ``columns`` ((key, header)
    pairs for the markdown table) and optional ``text`` (a paragraph above the table).
    """
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{device_slug(env)}"
    payload = {"benchmark": name, "label": result_label(env), "env": env,
               "sections": [{k: v for k, v in s.items() if k != "columns"} for s in sections]}
    if extra:
        payload.update(extra)
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")

    lines = [f"# {name}", "", f"**{result_label(env)}**", ""]
    lines += [
        f"- date: {env['date_utc']}",
        f"- device: {env['device_name']}",
        f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}",
        f"- timer: {env['timer']}",
        f"- command: `{env['command']}`",
        f"- git: {env.get('git_commit')}",
    ]
    for n in notes:
        lines.append(f"- {n}")
    for s in sections:
        lines += ["", f"## {s['title']}", ""]
        if s.get("text"):
            lines += [s["text"], ""]
        lines.append(markdown_table(s["rows"], s["columns"]))
    md_path = out / f"{stem}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def print_sections(env: dict, sections: list[dict]) -> None:
    print(result_label(env))
    for s in sections:
        print(f"\n## {s['title']}")
        if s.get("text"):
            print(s["text"])
        print(markdown_table(s["rows"], s["columns"]))


def base_parser(description: str, default_preset: str, presets: Iterable[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default=default_preset, choices=sorted(presets),
                   help=f"problem sizes (default {default_preset}; 'tiny' runs on a CPU under the interpreter)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (default: the GPU if there is one)")
    p.add_argument("--out", default=None, help=f"folder for the result files (default {RESULTS_DIR})")
    p.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up (default 25 on GPU, 0 on CPU)")
    p.add_argument("--rep-ms", type=float, default=None, help="do_bench repetition time (default 200 on GPU, 1000 for the optimizer; 0 on CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines (slow to build on a CPU)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--cpu-runs", type=int, default=3, help="least number of timed calls of the CPU timer")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no new row after this many seconds (the rows left out say so; files are still written)")
    p.add_argument("--compile-budget-s", type=float, default=None,
                   help="seconds the torch.compile baselines may take together; later compile rows are skipped")
    p.add_argument("--host-calls", type=int, default=20,
                   help="calls timed for a row's host part on CUDA (0: none)")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timing of the kernels' part")
    return p


def comma_choices(parser: argparse.ArgumentParser, text: str, allowed: Iterable[str], what: str) -> list[str]:
    """The items of a comma list option, each checked against ``allowed``."""
    allowed = tuple(allowed)
    items = [item for item in text.split(",") if item]
    for item in items:
        if item not in allowed:
            parser.error(f"unknown {what} {item!r}; choose from {allowed}")
    return items


def finish(name: str, env: dict, sections: list[dict], args, rows: list[dict], extra: dict) -> dict:
    """Print the tables, write the result files unless ``--no-write``; return the result."""
    print_sections(env, sections)
    result = {"env": env, "rows": rows, **extra}
    if not args.no_write:
        paths = write_results(name, env, sections, args.out, extra=extra)
        print("\nwrote " + ", ".join(str(x) for x in paths))
        result["paths"] = [str(x) for x in paths]
    return result


def apply_threads(args) -> None:
    """Apply ``--threads``, ``--cpu-runs`` and the budgets (``--time-budget-s``, whose clock
    starts here, and ``--compile-budget-s``)."""
    global CPU_MIN_RUNS
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    CPU_MIN_RUNS = max(1, getattr(args, "cpu_runs", 3))
    set_budgets(getattr(args, "time_budget_s", None), getattr(args, "compile_budget_s", None))


def bench_times(args, device: torch.device, gpu_rep_ms: float = 200.0) -> tuple[float, float]:
    """(warmup_ms, rep_ms): do_bench-like defaults on a GPU, as little as possible on a CPU."""
    gpu = device.type == "cuda"
    warm = args.warmup_ms if args.warmup_ms is not None else (25.0 if gpu else 0.0)
    rep = args.rep_ms if args.rep_ms is not None else (gpu_rep_ms if gpu else 0.0)
    return warm, rep


def release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def short_error(err: BaseException, limit: int = 200) -> str:
    msg = f"{type(err).__name__}: {err}".replace("\n", " ").replace("|", "/")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# ---- training studies (benchmarks/int8_parity.py, grid_comparison.py): run folders in, one report out


def machine_line() -> str:
    """The CPU, torch and commit a study's runs and report were made with, in one line."""
    env = environment(torch.device("cpu"))
    return f"{env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, commit {env['git_commit']}"


def write_study(name: str, report: dict, markdown: str) -> int:
    """``benchmarks/results/<name>.{json,md}`` from a study's report; 1 (and nothing written)
    when it has no row yet."""
    if not report["rows"]:
        print(f"{name}: no finished runs to report yet", file=sys.stderr)
        return 1
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(markdown)
    print(markdown)
    return 0


def study_main(argv, doc: str, run: Callable, report: Callable, add_options: Callable) -> int:
    """``run`` / ``report`` subcommands; ``add_options(parser, name)`` adds each one's options."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report"):
        add_options(sub.add_parser(name), name)
    args = p.parse_args(argv)
    return run(args) if args.cmd == "run" else report(args)
