"""Setup shared by the whole CPU suite.

Triton's interpreter must be switched on before any module that defines a ``@triton.jit``
kernel is imported (SPEC 5), and test modules import the kernels when they are collected:
so the switch is made here, before any test module loads. With CUDA the kernels compile
instead. Tests that need compiled Triton without a GPU run it in a child process without
TRITON_INTERPRET (``test_compile_gate.py``, ``test_compile_check.py``).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
