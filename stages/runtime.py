"""Where and how tensors are computed: device resolution, determinism, mixed precision.

The device is resolved once per stage and never changes *what* is computed (the same permutations, the
same steps, the same initial weights), only where.
"""

from __future__ import annotations

import contextlib
import os

import torch

from stages.cli import StageError


def resolve_device(name: str, key: str) -> torch.device:
    """Turn a params device name into a torch.device; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise StageError(f"{key}: {name} is not available ({count} CUDA devices here); use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise StageError(f"{key}: mps is not available on this machine; use auto or cpu")
    return device


def make_deterministic(tf32: bool = False) -> None:
    """Same params, same machine, same bytes: deterministic kernels, no TF32 unless asked for."""
    # cuBLAS needs a fixed workspace to be deterministic; it must be set before CUDA initialises.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def autocast_for(device: torch.device, precision: str, key: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 on CUDA; fp32 runs as is. Reduced precision elsewhere is refused."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise StageError(f"{key}: {precision} needs a CUDA device (this run uses {device}); use fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to `device`, through pinned memory and asynchronously on CUDA."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
