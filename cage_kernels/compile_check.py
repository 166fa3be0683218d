"""Compile Triton kernels for an NVIDIA GPU on a machine that has none, and read their
resource usage (registers, stack, spills, shared memory, tensor-core use) from the cubin.

Self-contained: imports only the standard library, torch and triton (nothing from ``cage``).

How it works. Triton's wheel carries ptxas and cuobjdump, so a kernel compiles down to a
cubin for any NVIDIA architecture without a driver or a GPU. What a launch needs from the
runtime is the *current target*; :func:`compile_target` installs a stand-in driver that
answers ``GPUTarget("cuda", arch, 32)`` (and device/stream placeholders), and
:func:`compile_only` then calls ``kernel.warmup(...)``, which compiles but never launches.
:func:`inspect` runs ``cuobjdump -res-usage -sass`` on the cubin.

    with compile_target(90):
        k = compile_only(my_kernel, (1,), (torch.bfloat16, torch.bfloat16, 4096), {"BLOCK": 1024})
    res = inspect(k, "my_kernel", 90)
    assert not res.problems(), res.problems()

Pointer arguments may be given as torch dtypes (``torch.float32``): ``warmup`` wraps them in
triton's ``MockTensor`` (data_ptr 0, so 16-byte aligned). Integer scalars are specialised as
triton does at a real launch (value 1 becomes a constant, multiples of 16 get the
divisibility hint), so pass values that resemble the real ones.

What it cannot tell: whether the results are right, or how fast the kernel runs.
Triton must have been imported, and the kernels decorated, with TRITON_INTERPRET unset:
``triton.jit`` reads it at decoration time, and triton's own ``tl.sum``/``tl.max``/``tl.cdiv``
are decorated when triton is first imported. A process that runs kernels interpreted cannot
also compile them; :func:`compile_target` and :func:`compile_only` say so rather than fail
deep inside triton. (Tests that must coexist with interpreted ones compile in a subprocess.)

Checked on Triton 3.6.0, 3.7.1 and 3.9.0 (CPU-only torch 2.13). Version notes:
- ``triton.runtime.driver.driver`` is a ``DriverConfig`` with ``set_active``/``reset_active``
  and a private ``_active`` in all three. Reading ``driver.active`` when nothing is active
  builds the default driver, which raises "0 active drivers" on a machine without a GPU, so
  the previous driver is saved and restored through ``_active`` (``None`` stays ``None``).
- ``JITFunction.warmup(*args, grid, **kwargs)`` -> ``run(..., warmup=True)`` and
  ``MockTensor.wrap_dtype`` are identical in 3.6, 3.7.1 and 3.9; so is
  ``CudaDriver.get_current_target`` (our override) and ``sm_arch_from_capability``, which
  turns capability 90 into ``sm_90a``.
- JITFunction caches its binder *and target* per device id (``device_caches[device]``), so
  the stand-in reports a per-arch device id (see ``_device_id``): otherwise compiling the same
  kernel for sm_80 and then sm_90 (or after real launches on GPU 0) would silently reuse the
  first target. :func:`compile_only` checks the compiled target anyway.
- All three wheels ship ``cuobjdump`` under ``triton/backends/nvidia/bin/`` (3.6: CUDA 12.8;
  3.7.1 and 3.9: CUDA 13.1); ``triton.knobs.nvidia.cuobjdump`` (present in all three) finds
  it and honours ``TRITON_CUOBJDUMP_PATH``. ``-res-usage`` prints
  ``REG:n STACK:n SHARED:n LOCAL:n ...`` and the SASS as ``/*0040*/  OPCODE ...`` lines in
  all of them (one ``-res-usage -sass`` run gives both). Read the cubin, not ``ptxas -v``
  (SPEC 5: the ptxas bundled with 3.9 cannot read that version's own PTX).
- ``metadata.shared`` is the dynamic shared memory triton requests at launch. cuobjdump's
  ``SHARED`` is the cubin's static shared memory: 0 on sm_80, but on sm_90 ptxas adds 1024 B
  (section ``.nv.shared.<kernel>``) to a kernel that uses shared memory, in all three
  versions. The driver holds static + dynamic to the 227 KB per CTA, so both are added.
- Results are identical on the three versions for the kernels tried (copy: 16 regs on
  sm_80, 18 on sm_90; [16,128]x[128,128] bf16 dot: 56 / 64 regs, HMMA on both; with
  [64,128] rows sm_90 uses HGMMA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile

import torch
import triton

SMEM_PER_CTA = 232448  # bytes a CTA may use, sm_80 and sm_90 (227 KB)
SMEM_PER_SM = 233472  # 228 KB
SMEM_RESERVED_PER_CTA = 1024  # the runtime reserves 1 KB of each CTA's shared memory (sm_80+)
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
WARPS_PER_SM = 64
CTAS_PER_SM = 32  # hardware limit on resident CTAs, sm_80 and sm_90
MAX_REGS = 255
ARCHS = (80, 90)

# SASS opcodes counted (prefix before the first '.'): local-memory traffic is spills (the
# kernels here use no local arrays), tensor-core MMAs (HMMA sm_80+, HGMMA = wgmma sm_90;
# IMMA/IGMMA/QGMMA for int8/fp8 would count too), and FP32 fused multiply-adds.
_SPILL_OPS = frozenset({"LDL", "STL"})
_MMA_OPS = frozenset({"HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA"})
_FFMA_OPS = frozenset({"FFMA"})

# A SASS instruction line: "/*0040*/  @!P0 LDL.64 R2, [R1+0x8] ;"
_SASS_OP = re.compile(r"/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _interpret_enabled() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _triton_imported_interpreted() -> bool:
    # triton.language.standard decorates tl.sum, tl.max, tl.cdiv, ... with @triton.jit when
    # triton is first imported, so the interpreter setting at *that* moment is baked into
    # them for the life of the process (3.6, 3.7.1 and 3.9 alike). Then compiling fails
    # (3.9: an AssertionError from gluon), just as interpreted kernels fail to call them when
    # triton was imported compiled. One process cannot do both.
    from triton.language import standard

    return type(standard.cdiv).__name__ == "InterpretedFunction"


def _driver_config():
    from triton.runtime.driver import driver

    return driver


def _device_id(arch: int) -> int:
    # Not a real device: a key of its own per arch in JITFunction.device_caches (which holds
    # the target), far from any real ordinal. Only the cache lookup and hooks see it.
    return -1000 - arch


def _stand_in_driver(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class CompileOnlyCudaDriver(CudaDriver):
        """Answers the target, device and stream; loads and launches nothing."""

        compile_only_arch = arch

        def __init__(self):  # CudaDriver.__init__ would load libcuda
            pass

        def get_current_device(self):
            return _device_id(arch)

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_device_capability(self, device=None):
            return divmod(arch, 10)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            raise RuntimeError("compile_check's stand-in driver has no device")

        @staticmethod
        def is_active():
            return False

    return CompileOnlyCudaDriver()


@contextlib.contextmanager
def compile_target(arch: int):
    """Within this block, triton compiles for sm_<arch> (80, or 90 meaning sm_90a) and never
    launches. The previously active driver (possibly none yet) is restored on exit."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if _interpret_enabled():
        raise RuntimeError(
            "TRITON_INTERPRET is set: kernels run interpreted and cannot be compiled; unset it "
            "before the kernels are defined (triton.jit reads it at decoration time)")
    if _triton_imported_interpreted():
        raise RuntimeError(
            "triton was imported with TRITON_INTERPRET=1: its own library functions (tl.sum, "
            "tl.max, tl.cdiv, ...) are interpreted and compiled kernels cannot call them. "
            "Compile in a process that imports triton with TRITON_INTERPRET unset")
    config = _driver_config()
    previous = config._active  # not .active: that would build the default driver and fail
    config.set_active(_stand_in_driver(arch))
    try:
        yield
    finally:
        config._active = previous


def _current_arch() -> int | None:
    return getattr(_driver_config()._active, "compile_only_arch", None)


def _innermost(kernel):
    while not hasattr(kernel, "device_caches") and hasattr(kernel, "fn"):
        kernel = kernel.fn  # Heuristics / Autotuner wrap a JITFunction in .fn
    return kernel


def compile_only(kernel, grid, args=(), kwargs=None):
    """Compile ``kernel`` for the target of the enclosing :func:`compile_target`; returns the
    compiled kernel (a list of them for an autotuned kernel: one per config).

    ``args`` are the kernel's positional arguments, with torch dtypes standing for tensors;
    ``kwargs`` its keyword arguments (constexprs, ``num_warps``, ``num_stages``, ...)."""
    arch = _current_arch()
    if arch is None:
        raise RuntimeError("compile_only must run inside `with compile_target(arch):`")
    inner = _innermost(kernel)
    if type(inner).__name__ == "InterpretedFunction":
        raise RuntimeError(
            f"{getattr(inner, '__name__', inner)} was decorated with TRITON_INTERPRET=1: it "
            "is interpreted and cannot be compiled")
    compiled = kernel.warmup(*args, grid=grid, **(kwargs or {}))
    for k in compiled if isinstance(compiled, list) else [compiled]:
        got = getattr(k.metadata.target, "arch", arch)
        if got != arch:
            raise RuntimeError(f"compiled for sm_{got}, expected sm_{arch}")
    return compiled


@dataclasses.dataclass(frozen=True)
class KernelResources:
    name: str
    arch: int
    num_warps: int
    registers: int  # per thread
    stack: int  # bytes per thread
    spill_instructions: int  # LDL + STL in the SASS
    shared_memory: int  # bytes per CTA (dynamic, as launched, plus static)
    mma_instructions: int  # HMMA + HGMMA (+ IMMA/IGMMA/QGMMA)
    ffma_instructions: int

    @property
    def ctas_per_sm(self) -> int:
        """Resident CTAs per SM, the minimum over registers, shared memory, warps and the
        hardware CTA limit (registers rounded up to the per-warp allocation unit)."""
        regs_per_warp = -(-max(1, self.registers) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
        by_regs = (REGS_PER_SM // regs_per_warp) // self.num_warps
        by_smem = SMEM_PER_SM // (self.shared_memory + SMEM_RESERVED_PER_CTA)
        by_warps = WARPS_PER_SM // self.num_warps
        return min(by_regs, by_smem, by_warps, CTAS_PER_SM)

    def problems(self, min_ctas_per_sm: int = 2) -> list[str]:
        """What is wrong with this kernel, in words; empty when nothing is."""
        out = []
        if self.spill_instructions:
            out.append(f"{self.spill_instructions} local-memory instructions (LDL/STL): "
                       "registers spill")
        if self.stack:
            out.append(f"stack of {self.stack} bytes per thread")
        if self.registers > MAX_REGS:
            out.append(f"{self.registers} registers per thread > {MAX_REGS}")
        if self.shared_memory > SMEM_PER_CTA:
            out.append(f"shared memory {self.shared_memory} B > {SMEM_PER_CTA} B per CTA: "
                       "the launch fails")
        ctas = self.ctas_per_sm
        if ctas < min_ctas_per_sm:
            out.append(f"{ctas} CTA(s) per SM < {min_ctas_per_sm} (registers {self.registers}"
                       f" x {self.num_warps} warps, shared memory {self.shared_memory} B)")
        return out

    def __str__(self) -> str:
        return (f"{self.name} sm_{self.arch}: warps={self.num_warps} regs={self.registers} "
                f"stack={self.stack} ldl/stl={self.spill_instructions} "
                f"smem={self.shared_memory} mma={self.mma_instructions} "
                f"ffma={self.ffma_instructions} ctas/SM={self.ctas_per_sm}")


def cuobjdump_path() -> str:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        with contextlib.suppress(Exception):
            return knobs.nvidia.cuobjdump.path
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(path):
        raise RuntimeError(f"cuobjdump not found (looked for {path})")
    return path


def _cuobjdump(cubin_path: str) -> str:
    # One run prints both: the "REG:.. STACK:.." lines and the SASS listing.
    cmd = [cuobjdump_path(), "-res-usage", "-sass", cubin_path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _count_ops(sass: str, ops: frozenset) -> int:
    return sum(m.group(1).split(".")[0] in ops for m in _SASS_OP.finditer(sass))


def inspect(compiled, name: str, arch: int) -> KernelResources:
    """Resources of one compiled kernel (from :func:`compile_only`), read from its cubin."""
    with tempfile.TemporaryDirectory(prefix="compile_check_") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = _cuobjdump(path)
    usage = _RES_USAGE.findall(sass)
    if not usage:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{sass[:2000]}")
    # One line per function; a Triton cubin holds the kernel (plus any noinline callees).
    # LOCAL (local arrays) is not reported apart: local memory is reached by LDL/STL, counted.
    regs, stack, static_smem = (max(int(u[i]) for u in usage) for i in range(3))
    meta = compiled.metadata
    return KernelResources(
        name=name,
        arch=arch,
        num_warps=int(meta.num_warps),
        registers=regs,
        stack=stack,
        spill_instructions=_count_ops(sass, _SPILL_OPS),
        shared_memory=int(meta.shared) + static_smem,
        mma_instructions=_count_ops(sass, _MMA_OPS),
        ffma_instructions=_count_ops(sass, _FFMA_OPS),
    )
