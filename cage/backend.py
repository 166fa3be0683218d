"""Choosing between the torch reference and the Triton kernels.

Triton is optional: importing ``cage`` never imports it. The Triton ops are looked up
lazily, the first time a caller asks for them.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def check_backend_name(backend: str, owner: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Looked up once at import (without importing triton): a plain constant traces cleanly
# under torch.compile, where a cached function call would not.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def resolve(backend: str, device: torch.device, owner: str = "cage") -> str:
    """``"torch"`` or ``"triton"`` for tensors on ``device``; errors if the choice cannot run."""
    check_backend_name(backend, owner)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_installed() else "torch"
    if not triton_installed():
        raise RuntimeError(f"{owner}: backend='triton' needs the triton package (pip install triton)")
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise RuntimeError(
            f"{owner}: backend='triton' on a {device.type} tensor needs Triton's interpreter: "
            "set TRITON_INTERPRET=1 before importing cage, or use backend='torch'"
        )
    return "triton"


_KERNELS: list = []


def kernels():
    """The ``cage_kernels`` package, imported the first time a Triton path runs (Triton is
    optional; the module is kept, so later calls pay a list lookup, not an import)."""
    if not _KERNELS:
        import cage_kernels

        _KERNELS.append(cage_kernels)
    return _KERNELS[0]
