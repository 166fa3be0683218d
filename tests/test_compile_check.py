"""cage_kernels.compile_check: compile kernels for sm_80 / sm_90 without a GPU and read their
resources from the cubin (SPEC 5). Needs triton's bundled cuobjdump; nothing here skips.

The compiles run in a child process (this file run as a script) whose environment lacks
TRITON_INTERPRET. One process cannot both interpret and compile: triton.jit reads
TRITON_INTERPRET when a kernel is decorated, and triton's own tl.sum / tl.max / tl.cdiv are
decorated when triton is first imported, so whichever mode triton was imported in holds for
the whole process. Other test modules set TRITON_INTERPRET=1 and import triton when there is
no GPU; this module therefore imports neither triton nor cage_kernels in the pytest process
(doing so before them would break their interpreted kernels), whatever order pytest
collects the modules in.
"""

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUNGRY = {"R": 32, "C": 256}  # 32*256 fp32 live values / 32 threads = 256 per thread > 255


@pytest.fixture(scope="module")
def child():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, f"compile child failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = json.loads(lines[0][len("RESULT "):])
    out["elapsed_s"] = elapsed
    return out


def test_kernels_are_compiled_not_interpreted(child):
    assert child["kernel_types"] == ["JITFunction", "JITFunction"]
    assert child["stdlib_type"] == "JITFunction"


@pytest.mark.parametrize("arch", [80, 90])
def test_copy_kernel_resources(child, arch):
    res = child["copy"][str(arch)]
    assert res["target_arch"] == arch
    assert res["arch"] == arch and res["num_warps"] == 4
    assert 0 < res["registers"] <= 255
    assert res["spill_instructions"] == 0 and res["stack"] == 0
    assert res["shared_memory"] <= 232448
    assert res["mma_instructions"] == 0
    assert res["ctas_per_sm"] >= 2
    assert res["problems"] == [], res


def test_same_kernel_two_archs_keeps_targets_apart(child):
    # JITFunction caches its target per device id: sm_80 first must not leak into sm_90.
    assert child["copy"]["80"]["cubin_sha"] != child["copy"]["90"]["cubin_sha"]


def test_previous_driver_restored(child):
    assert child["restore"] == {
        "none_before": True,  # nothing active yet (no GPU): compile_target leaves nothing
        "none_after": True,
        "sentinel_inside_replaced": True,
        "sentinel_after": True,
        "sentinel_after_exception": True,
    }


def test_register_hungry_kernel_spills(child):
    res = child["hungry"]
    assert res["spill_instructions"] > 0, res
    assert res["registers"] == 255 or res["stack"] > 0, res
    assert any("spill" in p for p in res["problems"]), res


def test_problems_flag_limits(child):
    assert child["limits"] == {
        "ok_problems": [], "ok_ctas": 6,  # 233472 // (32768 + 1024 reserved)
        "big_smem_flagged": True,
        "fat_ctas": 1, "fat_flagged": True, "fat_ok_at_1": [],
    }


def test_misuse_is_reported(child):
    assert "compile_target" in child["misuse"]["outside"]
    assert child["misuse"]["bad_arch"] == "ValueError"
    assert "TRITON_INTERPRET" in child["misuse"]["interpret_env"]


def test_compile_time_reasonable(child):
    # four small compiles and one register-hungry one, plus imports; cold cache ~10 s
    assert child["elapsed_s"] < 300, child["elapsed_s"]


# --------------------------------------------------------------------------------------------
# The child: run as a script, TRITON_INTERPRET unset, prints one "RESULT {json}" line.
# --------------------------------------------------------------------------------------------
if __name__ == "__main__":
    assert "TRITON_INTERPRET" not in os.environ
    import dataclasses
    import hashlib

    import torch
    import triton
    import triton.language as tl
    from triton.runtime.driver import driver

    from cage_kernels import compile_check as cc

    @triton.jit
    def copy_kernel(src, dst, n, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask) * scale, mask=mask)

    @triton.jit
    def hungry_kernel(x, y, n_rows, R: tl.constexpr, C: tl.constexpr):
        # The whole [R, C] fp32 block stays live across two reductions (one warp).
        rows = tl.program_id(0) * R + tl.arange(0, R)
        cols = tl.arange(0, C)
        offs = rows[:, None] * C + cols[None, :]
        mask = rows[:, None] < n_rows
        v = tl.load(x + offs, mask=mask, other=0.0)
        row_ss = tl.sum(v * v, axis=1)
        col_max = tl.max(tl.abs(v), axis=0)
        tl.store(y + offs, v / (row_ss[:, None] + col_max[None, :]), mask=mask)

    def compile_copy(arch):
        with cc.compile_target(arch):
            return cc.compile_only(copy_kernel, (8,), (torch.float32, torch.float32, 4096, 0.5),
                                   {"BLOCK": 512, "num_warps": 4})

    def as_dict(res, **extra):
        return {**dataclasses.asdict(res), "ctas_per_sm": res.ctas_per_sm,
                "problems": res.problems(), **extra}

    out = {"kernel_types": [type(copy_kernel).__name__, type(hungry_kernel).__name__],
           "stdlib_type": type(tl.standard.cdiv).__name__, "copy": {}}
    for arch in (80, 90):
        k = compile_copy(arch)
        out["copy"][str(arch)] = as_dict(cc.inspect(k, "copy", arch), target_arch=k.metadata.target.arch,
                                         cubin_sha=hashlib.sha1(k.asm["cubin"]).hexdigest())

    restore = {"none_before": driver._active is None}
    compile_copy(80)
    restore["none_after"] = driver._active is None
    saved, sentinel = driver._active, object()
    try:
        driver.set_active(sentinel)
        compile_copy(90)
        restore["sentinel_after"] = driver._active is sentinel
        try:
            with cc.compile_target(80):
                restore["sentinel_inside_replaced"] = driver._active is not sentinel
                raise KeyError("boom")
        except KeyError:
            pass
        restore["sentinel_after_exception"] = driver._active is sentinel
    finally:
        driver._active = saved
    out["restore"] = restore

    with cc.compile_target(90):
        k = cc.compile_only(hungry_kernel, (1,), (torch.float32, torch.float32, 32),
                            {**HUNGRY, "num_warps": 1})
    out["hungry"] = as_dict(cc.inspect(k, "hungry", 90))

    ok = cc.KernelResources("k", 90, num_warps=4, registers=32, stack=0, spill_instructions=0,
                            shared_memory=32768, mma_instructions=0, ffma_instructions=0)
    big = dataclasses.replace(ok, shared_memory=cc.SMEM_PER_CTA + 1)
    fat = dataclasses.replace(ok, num_warps=8, registers=255, shared_memory=0)
    out["limits"] = {
        "ok_problems": ok.problems(), "ok_ctas": ok.ctas_per_sm,
        "big_smem_flagged": any("shared memory" in p for p in big.problems()),
        "fat_ctas": fat.ctas_per_sm, "fat_flagged": any("CTA" in p for p in fat.problems()),
        "fat_ok_at_1": fat.problems(min_ctas_per_sm=1),
    }

    misuse = {}
    try:
        cc.compile_only(copy_kernel, (1,), (torch.float32, torch.float32, 16, 1.0), {"BLOCK": 16})
        misuse["outside"] = "no error"
    except RuntimeError as err:
        misuse["outside"] = str(err)
    try:
        with cc.compile_target(75):
            pass
        misuse["bad_arch"] = "no error"
    except Exception as err:  # noqa: BLE001
        misuse["bad_arch"] = type(err).__name__
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with cc.compile_target(90):
            pass
        misuse["interpret_env"] = "no error"
    except RuntimeError as err:
        misuse["interpret_env"] = str(err)
    del os.environ["TRITON_INTERPRET"]
    out["misuse"] = misuse
    print("RESULT " + json.dumps(out))
