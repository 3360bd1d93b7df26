"""Root pytest hooks, loaded before tests/conftest.py.

Without CUDA the Triton kernels run in Triton's CPU interpreter, which must be switched on before
triton is first imported (tests/conftest.py imports transformers -> torch._dynamo -> triton).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
