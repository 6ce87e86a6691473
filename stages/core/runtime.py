"""Where and how tensors are computed: device resolution, determinism, mixed precision.

The device is resolved once per stage and never changes *what* is computed (the same permutations, the
same steps, the same initial weights), only where.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Literal

import torch

from stages.core import products
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


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or `taskset` narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Threads beyond the CPUs run (the bytes do not depend on the count) but only wait; past this many per CPU
# the setting is refused.
THREADS_PER_CPU = 16


def resolve_threads(setting: int | Literal["auto"], processes: int = 1) -> int:
    """`auto`: this process's share of the available cores among `processes` on this machine; else as given.
    A few threads per CPU only wait for each other (the launcher warns); beyond THREADS_PER_CPU per CPU a
    count is a typo, not a setting, and starting that many threads would take the machine down first, so it
    is a SettingError naming the count that fits."""
    if setting == "auto":
        return max(1, available_cores() // processes)
    cpus = os.cpu_count() or 1
    if setting > THREADS_PER_CPU * cpus:
        raise SettingError(
            f"{setting} threads, more than this machine can start usefully ({THREADS_PER_CPU} per CPU, "
            f"{cpus} CPUs); set {cpus} or fewer for speed (or auto), at most {THREADS_PER_CPU * cpus}"
        )
    return setting


def check_memory(processes: int, data_bytes: int) -> None:
    """SettingError when `processes` copies of this process, each also holding `data_bytes`, need more memory
    than the machine has available. Measured now, at start, from this process: its anonymous memory is each
    process's own, its file-backed pages (the libraries' code) are shared by all of them."""
    rollup, meminfo = Path("/proc/self/smaps_rollup"), Path("/proc/meminfo")
    if not rollup.is_file() or not meminfo.is_file():  # not Linux: nothing to measure with
        return
    mine, machine = _sizes(rollup), _sizes(meminfo)
    own, shared = mine["Anonymous"] + data_bytes, mine["Rss"] - mine["Anonymous"]
    needed, available = shared + processes * own, machine["MemAvailable"]
    if needed > available:
        raise SettingError(
            f"{processes} processes of {own / 2**20:.0f} MiB each (measured at start, with the data each loads) "
            f"need {needed / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB available on this machine; "
            f"at most {max(0, (available - shared) // own)} fit"
        )


def _sizes(path: Path) -> dict[str, int]:
    """The `Name: N kB` lines of a /proc file, in bytes."""
    lines = (line.split() for line in path.read_text().splitlines())
    return {fields[0].rstrip(":"): int(fields[1]) * 1024 for fields in lines if len(fields) == 3 and fields[2] == "kB"}


def set_cpu_threads(count: int) -> None:
    """Spend `count` threads on the models' matrix products, which are most of a step's work; torch's own
    ops run on one.

    The bytes never depend on `count`: the products are cut into tasks by their shapes alone
    (stages/core/products.py), and torch's own reductions (the loss's mean, batch norm's statistics,
    sums a kernel splits among its threads) see a single thread whatever `count` is.
    """
    torch.set_num_threads(1)
    products.set_threads(count)


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
