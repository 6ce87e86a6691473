"""The CPU numerics every stage computes with, pinned so that any x86-64 CPU with AVX2 gives the same bytes.

Unless told otherwise, the CPU decides which kernels a float op runs, and each kernel sums in its own
order: ATen dispatches its vectorised kernels by CPU capability (AVX2, AVX-512), OpenBLAS picks its GEMM
kernels by CPU model, oneDNN its convolutions by instruction set. So the same params gave
other model bytes on another machine, and a teammate's `dvc repro` reran everything downstream.

Each library reads its variable once, when it initialises, so `pin` runs before torch and numpy load: it
is the one thing the `stages` package does on import. The choices:
- OpenBLAS (numpy's, which computes the models' matrix products: stages/core/products.py): `Haswell`, its
  AVX2+FMA kernels, which its DYNAMIC_ARCH build runs on any AVX2 CPU, Intel or AMD (its own choice would
  be SkylakeX's AVX-512 kernels on some, Zen on others). The thread count is products.py's business.
- ATen: `avx2`, the widest instruction set every such CPU has (AVX-512 machines run it too).
- oneDNN: at most `AVX2`, for the same reason as ATen.
- MKL: `COMPATIBLE`, its conditional numerical reproducibility on every x86-64 CPU. The products and
  convolutions never reach it (stages/core/pinning.py), but torch computes exp, log, sqrt, tanh, erf and
  the like with MKL's vector math, and FFTs and LAPACK with MKL, whose own choice follows the CPU.
A variable the user set to something else is overridden (and reported), never silently obeyed.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

PINNED = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}
# What torch reports (torch.backends.cpu.get_cpu_capability) when the pin took effect.
PINNED_CAPABILITY = "AVX2"
CPUINFO = Path("/proc/cpuinfo")
# The user's values that `pin` replaced in this process, for the stage to report.
OVERRIDDEN: dict[str, str] = {}


def pin() -> None:
    """Set the pinned variables, before torch and numpy load; the user's values it replaces go into OVERRIDDEN.

    Does nothing where it cannot apply: on a CPU that is not x86-64, or lacks AVX2 and FMA (forcing ATen's
    AVX2 kernels there would crash), or once torch or numpy is loaded (their libraries may have read their
    settings). `settings()` then tells what is in effect, and the model card records it.
    """
    if "torch" in sys.modules or "numpy" in sys.modules or not is_x86_64() or not has_avx2():
        return
    OVERRIDDEN.update({name: os.environ[name] for name in PINNED if os.environ.get(name, PINNED[name]) != PINNED[name]})
    os.environ.update(PINNED)


def settings() -> dict[str, str | None]:
    """The numerics in effect in this process, as the model card records them (imports torch)."""
    import numpy  # noqa: F401  (loads its OpenBLAS, for threadpoolctl to find)
    import torch
    from threadpoolctl import threadpool_info

    openblas = (info.get("architecture") for info in threadpool_info() if info["internal_api"] == "openblas")
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "openblas_coretype": next(openblas, None),
    }


def is_pinned(current: dict[str, str | None]) -> bool:
    """Whether `settings()` are the pinned ones, whose bytes every x86-64 CPU with AVX2 reproduces."""
    return current == {
        "cpu_capability": PINNED_CAPABILITY,
        "onednn_max_cpu_isa": PINNED["ONEDNN_MAX_CPU_ISA"],
        "openblas_coretype": PINNED["OPENBLAS_CORETYPE"],
    }


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def has_avx2() -> bool:
    """AVX2 and FMA, which ATen's AVX2 kernels need; read from /proc/cpuinfo, so without importing torch."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False  # not Linux: no way to tell before torch loads, so no pin (the card says so)
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx2" in flags and "fma" in flags
