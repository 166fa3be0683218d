"""pytest-benchmark glue for ``python -m pytest benchmarks/ --benchmark-only``.

Tests call the ``record`` fixture after ``benchmark(...)``; at the end of the session the
timings go to ``benchmarks/results/cpu_fallback-<device>.json`` / ``.md`` (or the folder in
``CAGE_BENCH_OUT``), with the ratios that guard the torch fallback against becoming
pathologically slow. A ratio above its bound fails the session.

``CAGE_BENCH_THREADS`` sets torch's CPU threads (default 1: on a small machine shared with other
jobs, more threads than free cores make every torch op wait on spinning workers).
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import common

_RECORDS: list[tuple[object, dict]] = []

# (numerator test, denominator test, bound, what it guards): ratios of the fastest rounds.
GUARDS = [
    ("test_cage_adamw_torch_silent_nocheck", "test_torch_adamw_single_tensor", 2.0,
     "CAGEAdamW(backend='torch') with lambda_t = 0 is AdamW's single-tensor algorithm"),
    ("test_cage_adamw_torch_silent", "test_torch_adamw_single_tensor", 4.0,
     "the same plus the default NaN/Inf check of CPU gradients (isfinite(g).all() per tensor)"),
    ("test_cage_adamw_torch_active", "test_torch_adamw_single_tensor", 12.0,
     "CAGE active: AdamW plus one quantizer pass (two rotations) per quantized matrix"),
    ("test_quantize_torch[act-fp32]", "test_rotation_matmul[act-fp32]", 12.0,
     "the reference quantizer: two block rotations plus ~15 elementwise passes"),
    ("test_fake_quant_fwd_bwd_torch[act-fp32]", "test_rotation_matmul[act-fp32]", 25.0,
     "forward and backward through autograd: four rotations"),
]


_LOAD: dict[str, tuple] = {}


def _loadavg():
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("CAGE_BENCH_THREADS", "1")))
    _LOAD["start"] = _loadavg()


@pytest.fixture
def record(request):
    def _record(benchmark, group: str, **info):
        _RECORDS.append((benchmark, {"test": request.node.name, "group": group, **info}))

    return _record


def _rows() -> list[dict]:
    rows = []
    for bm, info in _RECORDS:
        stats = getattr(getattr(bm, "stats", None), "stats", None)
        if stats is None:  # --benchmark-disable: nothing was timed
            continue
        row = dict(info)
        row.update(median_ms=stats.median * 1e3, min_ms=stats.min * 1e3, mean_ms=stats.mean * 1e3,
                   stddev_ms=stats.stddev * 1e3, rounds=stats.rounds)
        if "bytes" in row:
            row["gbps"] = common.gbps(row["bytes"], row["median_ms"])
        rows.append(row)
    return rows


def pytest_sessionfinish(session, exitstatus):
    rows = _rows()
    if not rows:
        return
    by = {r["test"]: r for r in rows}
    for r in rows:
        ref = by.get(r.get("baseline"))
        if ref:
            r["t/baseline"] = r["median_ms"] / ref["median_ms"]
            r["min/baseline min"] = r["min_ms"] / ref["min_ms"]
    guards = []
    failed = []
    for num, den, bound, why in GUARDS:
        if num in by and den in by:
            # fastest round over fastest round: on a shared machine the medians wander with
            # other jobs' load, the minima much less
            ratio = by[num]["min_ms"] / by[den]["min_ms"]
            ok = ratio <= bound
            guards.append({"ratio": f"{num} / {den}", "value": ratio, "bound": bound, "ok": ok, "why": why})
            if not ok:
                failed.append(f"{num} / {den} = {ratio:.2f} > {bound}")
    device = torch.device("cpu")
    env = common.environment(device)
    env["timer"] = "pytest-benchmark (time.perf_counter, calibrated rounds)"
    env["command"] = "python -m pytest benchmarks/ --benchmark-only"
    sections = [
        {"title": "CPU fallback (torch backend) timings", "rows": rows,
         "text": ("Medians and minima over pytest-benchmark rounds; t / baseline is the ratio of medians to the "
                  "row named in 'baseline' (same inputs), min / baseline min the ratio of the fastest rounds "
                  "(steadier on a shared machine; the guards use it). GB/s (from the median) where a byte "
                  "count is given."),
         "columns": [("group", "group"), ("test", "test"), ("median_ms", "median ms"), ("min_ms", "min ms"),
                     ("rounds", "rounds"), ("gbps", "GB/s"), ("baseline", "baseline"), ("t/baseline", "t / baseline"),
                     ("min/baseline min", "min / baseline min")]},
        {"title": "Guards against a pathologically slow fallback", "rows": guards,
         "columns": [("ratio", "ratio"), ("value", "value"), ("bound", "bound"), ("ok", "ok"), ("why", "why")]},
    ]
    env["loadavg_start"], env["loadavg_end"] = _LOAD.get("start"), _loadavg()
    notes = [f"torch threads: {torch.get_num_threads()} (CAGE_BENCH_THREADS)",
             f"load average (1, 5, 15 min) at start {env['loadavg_start']}, at end {env['loadavg_end']}: "
             "the machine may be shared with other jobs; compare rows of one run, not across runs"]
    paths = common.write_results("cpu_fallback", env, sections, os.environ.get("CAGE_BENCH_OUT"), notes=notes)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("cpu fallback results: " + ", ".join(str(p) for p in paths))
        for f in failed:
            reporter.write_line(f"PATHOLOGICALLY SLOW FALLBACK: {f}", red=True)
    if failed:
        session.exitstatus = 1
