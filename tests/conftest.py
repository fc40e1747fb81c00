"""Test-session set-up. Without a GPU, Triton kernels run in Triton's
interpreter, which must be switched on before any kernel is decorated."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import _triton_interp_dot

    _triton_interp_dot.install()
