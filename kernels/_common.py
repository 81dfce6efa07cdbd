"""Input checks shared by every kernel entry point: where a kernel may run, which dtypes it takes.

Each check raises an error that names the op and the problem, so that bad input never reaches
Triton (whose own errors are tracebacks through generated code).
"""

import os

import torch

# triton.jit picks the interpreter when it decorates a kernel, i.e. when this package is
# imported; read the variable at the same moment so the check below agrees with the kernels.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device where the kernels can run; returns that device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"{op}: tensors must be on one device, got {where}")
    (device,) = devices
    if device.type == "cuda":
        return device
    if device.type == "cpu" and INTERPRETING:
        return device
    if device.type == "cpu":
        raise RuntimeError(
            f"{op}: the Triton kernels need CUDA tensors (got CPU tensors). On a machine without "
            "a GPU, set TRITON_INTERPRET=1 before importing kernels to run them in Triton's "
            "interpreter, or use the eager PyTorch path (GPTModel(..., kernels='torch'))."
        )
    raise RuntimeError(f"{op}: the Triton kernels run on CUDA devices, got a tensor on {device}")


def check_float(op: str, **tensors: torch.Tensor | None) -> None:
    """Each given tensor is fp32, fp16 or bf16."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
