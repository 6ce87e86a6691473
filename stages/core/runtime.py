"""Where and how tensors are computed: device resolution, determinism, mixed precision.

The device is resolved once per stage and never changes *what* is computed (the same permutations, the
same steps, the same initial weights), only where.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from stages.core.errors import SettingError


def resolve_device(name: str) -> torch.device:
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
            raise SettingError(f"{name} is not available ({count} CUDA devices here); use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SettingError("mps is not available on this machine; use auto or cpu")
    return device


def make_deterministic(tf32: bool = False) -> None:
    """Same params, same machine, same bytes: deterministic kernels, no TF32 unless asked for."""
    # cuBLAS needs a fixed workspace to be deterministic; it must be set before CUDA initialises.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # torch.use_deterministic_algorithms also sets torch._inductor.config.deterministic, and importing
    # inductor costs about 1.1 s of start-up per stage here; it only matters under torch.compile, which
    # no stage uses. The C setter is what it calls for eager kernels; the public one stays the fallback
    # (tests/test_upstream.py fails when torch moves the setter or the public one stops importing inductor).
    set_deterministic = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_deterministic is None or "torch._inductor" in sys.modules:
        torch.use_deterministic_algorithms(True)
    else:
        set_deterministic(True)
    # Deterministic mode also fills every new tensor with NaN, a debugging aid against reading
    # uninitialised memory that no kernel here does, at a cost on every step.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def set_cpu_threads(count: int) -> None:
    """Use `count` threads for CPU ops (a CUDA run uses them only around its kernels).

    Fixed rather than left to torch (one per core): a matmul's float sums depend on how it is split
    among threads, so the same params give the same bytes on machines with other core counts; and on a
    busy machine a small model trains several times faster on one thread than on two that wait for each
    other (benchmarks/train_speed.py measures it).
    """
    torch.set_num_threads(count)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 on CUDA; fp32 runs as is. Reduced precision elsewhere is refused."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise SettingError(f"{precision} needs a CUDA device (this run uses {device}); use fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to `device`, through pinned memory and asynchronously on CUDA."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
