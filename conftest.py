"""Root pytest configuration, shared by tests/ and bench/.

Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors. The
interpreter is chosen when ``triton.jit`` decorates a kernel, so the variable must be set
before any kernel module is imported: this file is loaded by pytest before the test modules.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
