"""The GPU benchmark scripts run end to end on tiny sizes on the CPU, with the Triton kernels
under the interpreter, and write result files whose rows, byte counts and labels are right.

Each script runs in a subprocess with TRITON_INTERPRET=1 (it must be set before the kernel
modules are imported, whatever this process imported first). The numbers are CPU numbers; the
tests check the bookkeeping (rows, counted bytes, ratios, labels), not speed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from benchmarks import common
from benchmarks.shapes import shapes_for

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--device", "cpu", "--threads", "1", "--cpu-runs", "1", "--no-compile"]
ENV_KEYS = {"date_utc", "command", "device_name", "torch", "triton", "cuda", "timer", "gpu_result", "triton_interpret"}


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    """All the GPU scripts on their tiny presets, in one subprocess (one import of torch)."""
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--tiny", *SMOKE, "--out", str(out),
         "--train-step-args", "--warmup-steps 0 --steps 1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"run_all failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return out


def load(out: Path, name: str) -> tuple[dict, str]:
    stem = out / f"{name}-cpu-interpreter"
    data = json.loads(stem.with_suffix(".json").read_text())
    md = stem.with_suffix(".md").read_text()
    return data, md


def check_env_and_label(data: dict, md: str) -> None:
    assert ENV_KEYS <= set(data["env"])
    assert data["env"]["gpu_result"] is False and data["env"]["triton_interpret"] is True
    assert "NOT GPU results" in data["label"] and "NOT GPU results" in md
    assert "interpreter" in data["label"]
    assert data["copy"]["gbps"] > 0 and data["copy"]["bytes"] == 2 * data["copy"]["buffer_bytes"]
    for t in data["targets"]:
        assert t["status"].startswith("not measured")


def rows_of(data: dict) -> list[dict]:
    return data["sections"][0]["rows"]


@pytest.fixture(scope="module")
def optimizer_run(smoke_out):
    return load(smoke_out, "optimizer")


@pytest.fixture(scope="module")
def fake_quant_run(smoke_out):
    return load(smoke_out, "fake_quant")


@pytest.fixture(scope="module")
def train_step_run(smoke_out):
    return load(smoke_out, "train_step")


def test_optimizer_rows_and_counted_bytes(optimizer_run):
    data, md = optimizer_run
    check_env_and_label(data, md)
    rows = rows_of(data)
    methods = ["cage-triton", "cage-triton-default", "cage-triton-found-inf", "adamw-fused", "adamw-foreach",
               "adamw-fused+cage-eager", "cage-torch"]
    assert [(r["dtype"], r["method"]) for r in rows] == [(d, m) for d in ("fp32", "bf16") for m in methods]
    checks = {r["method"]: r["check"] for r in rows}
    assert checks["cage-triton"] == "False" and checks["cage-triton-found-inf"] == "found_inf passed"
    assert checks["cage-triton-default"] == "None: raise (host check)"  # a CPU run: the host check
    assert checks["adamw-fused"] is None
    numel = shapes_for("tiny").numel()
    assert data["numel"] == numel and data["numel_quant"] == shapes_for("tiny").numel("quant")
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["p20_ms"] <= r["ms"] <= r["p80_ms"]
        if r["dtype"] == "fp32":
            per = 28  # SPEC 4: read param, grad, m, v (16 B), write param, m, v (12 B)
        elif r["method"].startswith("cage"):
            per = 2 * 2 + 2 + 4 * 4  # bf16 param and grad, fp32 moments: 22 B
        else:
            per = 2 * 2 + 2 + 4 * 2  # torch's AdamW keeps bf16 moments for bf16 params: 14 B
        assert r["bytes_per_param"] == per and r["bytes"] == per * numel
        assert math.isclose(r["gbps"], r["bytes"] / (r["ms"] * 1e-3) / 1e9, rel_tol=1e-9)
        assert math.isclose(r["frac_copy"], r["gbps"] / data["copy"]["gbps"], rel_tol=1e-9)
        assert math.isclose(r["t/adamw-fused"], r["ms"] / next(
            x["ms"] for x in rows if x["dtype"] == r["dtype"] and x["method"] == "adamw-fused"), rel_tol=1e-9)
        if "cage" in r["method"]:
            assert r["cage_lambda_t"] == 10.0  # CAGE is active while timed
        assert "host_ms" not in r and "graph_ms" not in r  # a CPU run: all of it is host time
    assert "| fp32 | cage-triton | False | 28 |" in md and "| bf16 | cage-triton | False | 22 |" in md
    assert "| host ms | kernels ms (graph) |" in md


def test_fake_quant_rows_and_counted_bytes(fake_quant_run):
    data, md = fake_quant_run
    check_env_and_label(data, md)
    rows = rows_of(data)
    cases = [("act 32x256 bf16", 32, 256, 2), ("weight 32x128 fp32", 32, 128, 4)]
    expect = [(c[0], d, i) for c in cases for d in ("fwd", "bwd") for i in ("triton", "torch-eager")]
    assert [(r["case"], r["dir"], r["impl"]) for r in rows] == expect
    for name, n_rows, n_cols, es in cases:
        packed = n_rows * ((n_cols + 7) // 8)
        for r in rows:
            if r["case"] != name:
                continue
            assert r["status"] == "ok", r
            assert r["ms"] > 0
            assert r["bytes"] == n_rows * n_cols * 2 * es + packed  # x/grad in + out + packed mask
            assert r["mask_bytes_stored"] == (packed if r["impl"] == "triton" else n_rows * n_cols)
            assert r["rotation_flops"] == 2 * 2 * 128 * n_rows * n_cols
            assert math.isclose(r["gbps"], r["bytes"] / (r["ms"] * 1e-3) / 1e9, rel_tol=1e-9)
            if r["impl"] == "triton" and r["dir"] == "fwd":
                assert r["max_abs_diff_vs_eager"] < 1e-2  # the kernel computes the same Q(x)
            if r["impl"] == "torch-eager":
                assert r["t/torch-eager"] == 1.0
    assert "| act 32x256 bf16 | fwd | triton |" in md


def test_train_step_rows(train_step_run):
    data, md = train_step_run
    assert ENV_KEYS <= set(data["env"]) and "NOT GPU results" in md
    rows = rows_of(data)
    assert [r["method"] for r in rows] == ["bf16", "quest-eager", "quest-triton", "cage-eager", "cage-triton",
                                           "cage-triton-found-inf", "quest-int8", "quest-int8-fused",
                                           "cage-triton-int8", "torchao-float8"]
    assert data["tokens_per_step"] == data["batch"] * data["seq"] == 64
    skipped = rows.pop()  # torchao's float8 training needs an fp8 GPU
    assert skipped["status"].startswith("skipped: torchao float8 training needs a CUDA GPU"), skipped
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ms"] > 0
        assert math.isclose(r["tokens_per_s"], 64 / (r["ms"] * 1e-3), rel_tol=1e-9)
        assert abs(r["loss"] - math.log(256)) < 0.5  # one step from a random init
    assert rows[0]["t/bf16"] == 1.0
    assert data["targets"][0]["status"].startswith("not measured")


def test_run_all_writes_where_out_says_with_host_and_a_summary(smoke_out):
    names = {p.name for p in smoke_out.iterdir()}
    assert {"optimizer-cpu-interpreter.json", "fake_quant-cpu-interpreter.json", "train_step-cpu-interpreter.json",
            "host-cpu-interpreter.json", "run_all-summary.json"} <= names
    summary = json.loads((smoke_out / "run_all-summary.json").read_text())
    by = {e["benchmark"]: e for e in summary}
    assert list(by) == ["optimizer", "fake_quant", "train_step", "dequant_matmul", "int8_linear", "host"]
    assert by["dequant_matmul"]["status"].startswith("skipped") and by["optimizer"]["status"] == "ok"
    assert by["host"]["status"] == "ok" and by["host"]["goals"]  # the goals travel with the summary
    for e in summary:
        assert e["argv"][e["argv"].index("--out") + 1] == str(smoke_out)
        assert all(Path(f).parent == smoke_out for f in e.get("files", []))


# ---- the helpers, without subprocesses ----------------------------------------------------


def test_host_and_graph_timers_say_nothing_off_cuda():
    import torch

    cpu = torch.device("cpu")
    assert common.host_time(lambda: None, cpu) is None
    assert common.graph_bench(lambda: None, cpu, 20) == (None, "no CUDA")
    row = {}
    common.split_times(row, lambda: None, cpu, None, 20, capturable=True)
    assert row == {}  # a CPU call is all host time: no split


def test_split_times_on_cuda_records_both_parts(monkeypatch):
    import torch

    cuda = torch.device("cuda")
    seen = {}
    monkeypatch.setattr(common, "host_time", lambda fn, device, calls: common.Timing(0.5, 0.4, 0.6, calls))

    def graph(fn, device, rep_ms):
        seen["rep_ms"] = rep_ms
        return common.Timing(2.0, 1.9, 2.1), "do_bench_cudagraph"

    monkeypatch.setattr(common, "graph_bench", graph)
    args = types.SimpleNamespace(host_calls=7, no_graph=False)
    row = {}
    common.split_times(row, lambda: None, cuda, args, 300, capturable=True)
    assert (row["host_ms"], row["graph_ms"], row["graph"], row["host_bound"]) == (0.5, 2.0, "do_bench_cudagraph", False)
    assert seen["rep_ms"] == 50  # one graph of ~50 ms, whatever do_bench's window
    row = {}
    common.split_times(row, lambda: None, cuda, args, 300, capturable=False, why_not="not capturable (x)")
    assert row["host_ms"] == 0.5 and "graph_ms" not in row and row["graph"] == "not capturable (x)"
    row = {}
    common.split_times(row, lambda: None, cuda, types.SimpleNamespace(host_calls=7, no_graph=True), 300, True)
    assert row["graph"] == "not timed (--no-graph)"


@pytest.mark.parametrize("style", ["quantiles", "return_mode", "raises"])
def test_graph_bench_across_triton_signatures(monkeypatch, style):
    import torch

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    calls = []

    def with_quantiles(fn, rep=20, grad_to_none=None, quantiles=None, return_mode="mean"):
        calls.append((rep, quantiles))
        return [2.0, 1.0, 3.0]

    def with_return_mode(fn, rep=20, grad_to_none=None, return_mode="mean"):
        calls.append((rep, return_mode))
        return 2.0

    def raises(fn, rep=20, quantiles=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    fake = {"quantiles": with_quantiles, "return_mode": with_return_mode, "raises": raises}[style]
    t, how = common.graph_bench(lambda: None, torch.device("cuda"), 50, do_bench_cudagraph=fake)
    if style == "raises":
        assert t is None and how.startswith("not captured: RuntimeError")
        return
    assert how == "do_bench_cudagraph" and t.median_ms == 2.0 and calls[0][0] == 50
    assert calls[0][1] == ([0.5, 0.2, 0.8] if style == "quantiles" else "median")


def test_budgets_leave_rows_out_and_say_so():
    from benchmarks import bench_optimizer

    base = ["--preset", "tiny", "--device", "cpu", "--dtypes", "fp32", "--no-write", "--cpu-runs", "1",
            "--warmup-ms", "0", "--rep-ms", "0"]
    try:
        out = bench_optimizer.main(base + ["--methods", "adamw-fused,adamw-foreach", "--time-budget-s", "0"])
        assert [r["status"] for r in out["rows"]] == ["skipped: time budget spent (--time-budget-s 0)"] * 2
        out = bench_optimizer.main(base + ["--methods", "adamw-compile,adamw-fused", "--compile-budget-s", "0"])
        status = {r["method"]: r["status"] for r in out["rows"]}
        assert status == {"adamw-compile": "skipped: compile budget spent (--compile-budget-s 0)", "adamw-fused": "ok"}
        assert [r["method"] for r in out["rows"]] == ["adamw-compile", "adamw-fused"]  # the order asked for
    finally:
        common.set_budgets()


def test_compile_budget_is_spent_by_the_compile_rows():
    common.set_budgets(None, 5.0)
    try:
        assert common.compile_refused() is None and common.over_budget() is None
        common.spend_compile(6.0)
        assert common.compile_refused().startswith("skipped: compile budget spent")
        assert common.over_budget() is None  # the other rows still run
        common.set_budgets(0.0, None)
        assert common.over_budget().startswith("skipped: time budget") and common.compile_refused()
    finally:
        common.set_budgets()


def test_byte_formulas():
    assert common.adamw_bytes_per_param(4, 4, 4) == 28
    assert common.adamw_bytes_per_param(2, 2, 4) == 22
    assert common.fake_quant_forward_bytes(8192, 4096, 2, 2) == 8192 * 4096 * 4 + 8192 * 512
    assert common.fake_quant_forward_bytes(3, 10, 4, 4) == 3 * 10 * 8 + 3 * 2  # ceil(10 / 8) = 2 B a row
    assert common.fake_quant_backward_bytes(4, 16, 2) == 4 * 16 * 4 + 4 * 2


def test_dequant_matmul_benchmark_refuses_a_cpu_device(capsys):
    from benchmarks import bench_dequant_matmul

    # --device cpu is a CPU run on any machine, GPU or not: it says so instead of timing the interpreter
    assert bench_dequant_matmul.main(["--device", "cpu", "--no-write"]) == {"skipped": "no CUDA device"}
    assert "skipped, it needs a CUDA device" in capsys.readouterr().out


def test_dequant_matmul_benchmark_rows_on_cpu():
    # the GPU-only benchmark's bookkeeping, run here on a tiny case under the interpreter
    code = (
        "import torch\n"
        "from benchmarks import bench_dequant_matmul as b, common\n"
        "common.CPU_MIN_RUNS = 1\n"
        "case = b.Case('t', 3, 64, 40)\n"
        "rows = {r['impl']: r for r in b.run_case(case, 3, torch.device('cpu'), 0, 0, 10.0)}\n"
        "assert list(rows) == list(b.IMPLS) and all(r['status'] == 'ok' for r in rows.values()), rows\n"
        "packed = 40 * 24 + 4 * 40\n"  # 64 codes of 3 bits: 24 bytes a row; fp32 step
        "assert rows['fused']['bytes'] == rows['dequant+linear']['bytes'] == (3 * 64 + 3 * 40) * 2 + packed\n"
        "assert rows['bf16-linear']['bytes'] == (3 * 64 + 3 * 40) * 2 + 2 * 40 * 64\n"
        "assert rows['fused']['rel_rms_vs_torch'] < 2 ** -7\n"  # bf16 outputs and weight: rounding only
        "assert rows['dequant+linear']['t/dequant+linear'] == 1.0 and 't/bf16-linear' in rows['fused']\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_rotating_inputs_cycle_without_copies():
    import torch

    made = []
    rot = common.Rotating(lambda i: made.append(torch.full((4,), float(i))) or made[-1], 16, torch.device("cpu"))
    assert len(rot) >= 2
    seen = [rot.next() for _ in range(2 * len(rot))]
    assert all(a is b for a, b in zip(seen, made + made))  # the same tensors, in turn


@pytest.mark.parametrize("style", ["quantiles", "return_mode", "plain"])
def test_do_bench_wrapper_across_triton_signatures(style):
    calls = []

    def with_quantiles(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        calls.append((warmup, rep, quantiles))
        return [2.0, 1.0, 3.0]

    def with_return_mode(fn, warmup=25, rep=100, return_mode="mean"):
        calls.append((warmup, rep, return_mode))
        return 2.0

    def plain(fn, warmup=25, rep=100):
        calls.append((warmup, rep))
        return 2.0

    fake = {"quantiles": with_quantiles, "return_mode": with_return_mode, "plain": plain}[style]
    t = common._do_bench_gpu(lambda: None, 10, 50, do_bench=fake)
    assert t.median_ms == 2.0
    assert calls[0][:2] == (10, 50)
    if style == "quantiles":
        assert calls[0][2] == [0.5, 0.2, 0.8] and (t.p20_ms, t.p80_ms) == (1.0, 3.0)
    if style == "return_mode":
        assert calls[0][2] == "median"


def test_result_files_name_the_device_and_say_what_they_are(tmp_path):
    import torch

    env = common.environment(torch.device("cpu"))
    sections = [{"title": "t", "rows": [{"a": 1.5, "b": "x"}], "columns": [("a", "A"), ("b", "B")]}]
    j, m = common.write_results("demo", env, sections, tmp_path)
    assert j.name.startswith("demo-cpu") and j.suffix == ".json" and m.suffix == ".md"
    data = json.loads(j.read_text())
    assert data["sections"][0]["rows"] == [{"a": 1.5, "b": "x"}]
    assert "| A | B |" in m.read_text() and "| 1.5 | x |" in m.read_text()
    assert "NOT GPU results" in m.read_text()


def test_bench_data_records_the_environment_with_commons_helpers(monkeypatch):
    # review (issue 19 item 3 follow-up): bench_data had its own copies of common._cpu_model (one that
    # left /proc/cpuinfo open) and common._version; it takes both from common now
    import warnings

    import torch

    from benchmarks import bench_data

    assert not hasattr(bench_data, "_cpu_model") and not hasattr(bench_data, "_version")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        env = common.environment(torch.device("cpu"))
    monkeypatch.setattr(common, "_version", lambda name: {"tokenizers": "9.9.9"}.get(name))
    text = bench_data._versions_text(env)
    assert f"CPU: {env['cpu']};" in text and f"torch {env['torch']}" in text
    assert "tokenizers 9.9.9" in text and "numpy absent" in text
