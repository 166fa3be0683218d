"""The compile gate (``python -m cage_kernels.compile_gate``): every kernel configuration the
launchers plan, compiled for sm_80 and sm_90a with the installed Triton, has no register
spills, no stack, shared memory within a CTA's 227 KB and at least 2 resident CTAs per SM.

It compiles in a child process without TRITON_INTERPRET: one process cannot both
interpret and compile Triton kernels (see tests/test_compile_check.py), and the other
kernel tests run interpreted. Nothing here imports triton in the pytest process.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the gate must cover (issue 8): rows of these widths, these bit widths and masks,
# rotation on / rotated-domain output / off, every launcher.
REQUIRED_ROW_LENGTHS = {640, 768, 1024, 1792, 2048, 4096, 5632, 8192, 11008, 14336, 28672}


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "cage_kernels.compile_gate", "--arch", "80", "--arch", "90",
         "--out", str(out / "report.md"), "--json", str(out / "summary.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=2400,
    )
    assert (out / "summary.json").exists(), proc.stderr[-6000:]
    return proc, json.loads((out / "summary.json").read_text()), (out / "report.md").read_text()


@pytest.mark.parametrize("arch", ["80", "90"])
def test_every_kernel_compiles_without_spills_and_fits(gate, arch):
    proc, summary, _ = gate
    found = summary["archs"][arch]
    assert found["problems"] == [], "\n".join(found["problems"])
    assert found["max_registers"] <= 255 and found["min_ctas_per_sm"] >= 2
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("arch", ["80", "90"])
def test_the_gate_covers_the_named_configurations(gate, arch):
    _, summary, report = gate
    coverage = summary["coverage"]
    assert REQUIRED_ROW_LENGTHS <= set(coverage["row_lengths"])
    assert {1, 16384} <= set(coverage["row_counts"]) and {2, 3, 4, 8} <= set(coverage["bits"])
    assert set(coverage["masks"]) == {"none", "clip", "trust"}
    assert {(True, True), (True, False), (False, True)} <= {tuple(r) for r in coverage["rotations"]}
    found = summary["archs"][arch]
    assert set(found["ops"]) == {"forward", "backward", "optimizer", "dequant_matmul", "int8_matmul"}
    assert {1, 16, 512, 4096} <= set(coverage["matmul_tokens"]) and {2, 3, 4, 8} <= set(coverage["matmul_bits"])
    assert [4096, 11008] in coverage["matmul_shapes"]
    assert {(4096, 14336), (4100, 4096)} <= {tuple(s) for s in coverage["int8_matmul_shapes"]}
    assert {1, 16, 64, 512, 4096} <= set(coverage["int8_matmul_tokens"])
    labels = "\n".join(found["labels"])
    for needle in ("fp32 [16384x28672] H128 b8 trust", "bf16 [1x640] noH b2 clip", "fp16 [7x11008] H128 b3 none rotated-out",
                   "bf16 cage coupled [14336 cols] H128", "fp32 cage decoupled [11008 cols] H128",
                   "bf16 fp32-grads cage decoupled", "fp32 adamw plain vec1", "no-flag",
                   "bf16 [1x4096] @ [11008x4096]^T b4", "fp16 [4096x11008] @ [4096x11008]^T b3 bias",
                   "fp32 [16x4096] @ [14336x4096]^T b8",
                   "bf16 [1x4096] @ [4096x4096]^T int8", "fp16 [512x14336] @ [4096x14336]^T int8 bias",
                   "fp32 [16x640] @ [1792x640]^T int8 bias", "fp16 [64x4096] @ [4096x4096]^T int8",
                   "bf16 [4096x4100] @ [4096x4100]^T int8",
                   "bf16 [4096x11008] H128 b4 trust integer", "fp16 [16x640] H128 b4 none rotated-out centered codes",
                   "fp32 [4096x4096] H128 b8 trust rotated-out integer codes",
                   "bf16 cage coupled [11008 cols] H128 vec16 integer grid"):
        assert needle in labels, needle
    # many configurations share a specialization: the gate compiles each once
    assert found["kernels"] < found["configs"] / 5
    assert f"## sm_{arch}" in report
