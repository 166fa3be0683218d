"""Where a run executes: device, autocast, CPU threads, and the versions recorded with results."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # config.py imports this module to check --device
    from .config import TrainConfig

DEVICES = "auto, cpu, cuda, cuda:N or mps"


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs since boot, from /proc/stat (Linux); None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait, all


def choose_threads(sample_s: float = 0.3) -> int:
    """CPU threads for a run that does not set ``threads``: torch's default (one per core), less
    the cores that other processes keep busy right now.

    OpenMP threads that share their core with another busy process wait on each other at every
    parallel region; on two shared cores this ran a training step 3x slower with 2 threads than
    with 1. On an idle machine this is torch's default.
    """
    default = torch.get_num_threads()
    before = _cpu_times()
    if before is None:
        return default
    time.sleep(sample_s)
    after = _cpu_times()
    total = after[1] - before[1]
    if total <= 0:
        return default
    busy_cores = (1.0 - (after[0] - before[0]) / total) * (os.cpu_count() or default)
    return max(1, min(default, round((os.cpu_count() or default) - busy_cores)))


def resolve_device(name: str) -> torch.device:
    """The device of ``--device`` (one of DEVICES); ValueError if it is not available here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("--device mps: this torch build or machine has no MPS (Apple GPU); use --device cpu")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"--device must be {DEVICES}, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); "
                         "use --device cpu or auto")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)


def memory_bytes(device: torch.device) -> int | None:
    """The memory a run on ``device`` can have at most: the GPU's total memory for CUDA, the
    machine's physical memory for the CPU; None where it is not known (MPS, no sysconf)."""
    if device.type == "cuda":
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            return torch.cuda.get_device_properties(index).total_memory
        except (RuntimeError, AssertionError, AttributeError):  # no usable CUDA after all
            return None
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def use_device(device: torch.device) -> torch.device:
    """Make a CUDA ``device`` the current one (``torch.cuda.set_device``: what runs without an
    explicit device, Triton launches and the caching allocator's default, goes there, so
    ``--device cuda:1`` runs on cuda:1), with its index filled in; other devices as they are."""
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch ``t`` on ``device``, without a host sync: torch copies pageable memory to a
    GPU with ``cudaMemcpyAsync`` and then ``cudaStreamSynchronize`` (the host waits for every
    queued kernel), while a copy from pinned memory with ``non_blocking=True`` is queued like a
    kernel (torch's caching host allocator keeps the pinned buffer until the copy has run).
    Other devices: ``t.to(device)``."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def autocast_context(cfg: TrainConfig, device: torch.device):
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if dtype == "bf16":
        return dtype, torch.autocast(device.type, dtype=torch.bfloat16)
    return dtype, contextlib.nullcontext()


def environment(device: torch.device) -> dict:
    """Versions and hardware, for metrics.json."""

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": version("numpy"),
        "triton": version("triton"),
        "cage_commit": commit,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
    }
