"""Setup shared by the whole CPU suite.

Triton's interpreter must be switched on before any module that defines a ``@triton.jit``
kernel is imported (SPEC 5), and test modules import the kernels when they are collected:
so the switch is made here, before any test module loads. With CUDA the kernels compile
instead. Tests that need compiled Triton without a GPU run it in a child process without
TRITON_INTERPRET (``test_compile_gate.py``, ``test_compile_check.py``).
"""

import os
import socket

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a torchrun's --master-port). Test modules take it
    with ``from conftest import free_port``: pytest puts this folder on sys.path (there is no
    tests/__init__.py), from the repository root or elsewhere, with ``pytest`` or ``python -m pytest``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
