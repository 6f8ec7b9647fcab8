import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any test
# module imports a kernel module: without a GPU, the Triton kernels run in its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
