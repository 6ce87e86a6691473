"""The price of the pinned products: every product the models compute, and one cnn epoch, pinned against
torch's own unpinned choice, same run, same machine.

Run by hand, never in CI (no data needed):

    python -m benchmarks.matmul_pin [--threads 2] [--images 55000] [--rounds 5]

(1) Each matrix product of a training step of the three models at their recipes' batch sizes (the cnn's
    convolutions as the pinned convolution computes them: forward, input gradient, weight gradient; the linear
    layers' likewise), computed by stages/core/products.py on `--threads` threads with OpenBLAS pinned to
    Haswell, against torch's own matmul on as many threads with nothing pinned (MKL's own choice of
    kernels and thread split). Per product, the fastest of `--rounds` rounds, in wall-clock and in CPU
    seconds (all threads together: on a busy machine wall-clock times are the other processes' as much
    as these, CPU seconds much less); the ratios are pinned / unpinned (target <= 1.15).
(2) One epoch of the cnn recipe as the train stage runs it (the plain torch.nn CNN under
    stages.core.pinning's context, each batch normalised ahead on the gather thread), against the same
    architecture written as plain PyTorch (nn.Conv2d on NCHW maps, nn.Linear, torch's own kernels on
    `--threads` threads, nothing pinned), on random images of Fashion-MNIST's size: same batches, same
    fused Adam. The ratios, wall-clock and CPU, are pinned / plain (target <= 1.0).
Each variant runs in its own fresh process: the pin must be set before torch and numpy load.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import time

from benchmarks.isolated import run_isolated
from benchmarks.results import ratio, recorded

# (M, K, N): a (M, K) @ (K, N) product, or "over rows" (M, K).T @ (M, N) -> (K, N), a sum over the M rows.
CNN_BATCH, LINEAR_BATCH = 128, 1024  # the recipes' batch sizes (README, Models; params.yaml)
PRODUCTS = {
    "cnn conv1 forward": ("rows", (CNN_BATCH * 784, 9, 16)),
    "cnn conv1 weight grad": ("over rows", (CNN_BATCH * 784, 16, 9)),
    "cnn conv2 forward": ("rows", (CNN_BATCH * 196, 144, 32)),
    "cnn conv2 input grad": ("rows", (CNN_BATCH * 196, 32, 144)),
    "cnn conv2 weight grad": ("over rows", (CNN_BATCH * 196, 32, 144)),
    "cnn head forward": ("rows", (CNN_BATCH, 1568, 128)),
    "cnn head input grad": ("rows", (CNN_BATCH, 128, 1568)),
    "cnn head weight grad": ("over rows", (CNN_BATCH, 128, 1568)),
    "logreg forward": ("rows", (LINEAR_BATCH, 784, 10)),
    "logreg weight grad": ("over rows", (LINEAR_BATCH, 10, 784)),
    "mlp layer 1 forward": ("rows", (LINEAR_BATCH, 784, 256)),
    "mlp layer 1 weight grad": ("over rows", (LINEAR_BATCH, 256, 784)),
    "mlp layer 2 forward": ("rows", (LINEAR_BATCH, 256, 10)),
    "mlp layer 2 input grad": ("rows", (LINEAR_BATCH, 10, 256)),
    "mlp layer 2 weight grad": ("over rows", (LINEAR_BATCH, 10, 256)),
}
# What steers the kernels of torch and numpy: the plain variant clears it, so that each library chooses.
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OPENBLAS_CORETYPE")
# What each ratio is, as the tables of the README and docs/speed.md name it (benchmarks/figures.py).
SLOWEST_LABEL = "the slowest product of logreg, mlp and cnn, pinned / torch's own (MKL), CPU time"
ALL_LABEL = "all the products together, pinned / torch's own"
CNN_LABEL = "one cnn epoch / the same net in plain PyTorch (`nn.Conv2d`)"


def load_torch(pinned: bool):
    """torch, loaded after `stages` (which pins the numerics) or with nothing pinned."""
    if pinned:
        import stages  # noqa: F401
    else:
        for name in KERNEL_VARIABLES:
            os.environ.pop(name, None)
    import torch

    return torch


def cpu_seconds() -> float:
    """This process's CPU time so far, all its threads together."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fastest(function, rounds: int) -> tuple[float, float]:
    """Wall-clock and CPU seconds per call of `function`, each the fastest round's (a round: about 0.2 s)."""
    function()
    start = time.perf_counter()
    function()
    calls = max(1, int(0.2 / max(time.perf_counter() - start, 1e-6)))
    wall = cpu = float("inf")
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        for _ in range(calls):
            function()
        wall = min(wall, (time.perf_counter() - start) / calls)
        cpu = min(cpu, (cpu_seconds() - start_cpu) / calls)
    return wall, cpu


def product_times(pinned: bool, threads: int, rounds: int) -> dict:
    torch = load_torch(pinned)
    from stages.core import products
    from stages.core.runtime import set_cpu_threads

    if pinned:
        set_cpu_threads(threads)
    else:
        torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    seconds = {}
    for name, (kind, (m, k, n)) in PRODUCTS.items():
        a = torch.randn(m, k, generator=generator)
        b = torch.randn(k, n, generator=generator) if kind == "rows" else torch.randn(m, n, generator=generator)
        if pinned:
            left, right = a.numpy(), b.numpy()  # the arrays the model's tensors share memory with
            product = products.matmul if kind == "rows" else products.matmul_over_rows
            seconds[name] = fastest(functools.partial(product, left, right), rounds)
        else:
            seconds[name] = fastest(functools.partial(torch.matmul, a if kind == "rows" else a.T, b), rounds)
    return seconds


def cnn_epoch(pinned: bool, threads: int, images: int) -> dict:
    """Seconds for one epoch of the cnn recipe's architecture: the train stage's, pinned, or plain PyTorch unpinned."""
    torch = load_torch(pinned)
    from torch import nn

    from stages.core.contract import Architecture
    from stages.core.runtime import make_deterministic, set_cpu_threads

    make_deterministic()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (images, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (images,), generator=generator)
    if pinned:
        from stages.core.model import build_model
        from stages.core.pinning import pinned_cpu

        set_cpu_threads(threads)
        architecture = Architecture(
            model="cnn", hidden=(128,), image_shape=(28, 28), num_classes=10, mean=0.29, std=0.35, channels=(16, 32)
        )
        model = build_model(architecture)
        with pinned_cpu():
            return timed_epoch(model.net, pixels, labels, CNN_BATCH, model.normalise)
    else:
        torch.set_num_threads(threads)

        class Normalise(nn.Module):
            def forward(self, images):
                return (images.unsqueeze(1).float() * (1 / (255 * 0.35)) - 0.29 / 0.35).contiguous()

        def block(channels_in, channels_out):
            conv = nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)
            return [conv, nn.MaxPool2d(2), nn.BatchNorm2d(channels_out), nn.ReLU()]

        model = nn.Sequential(
            Normalise(),
            *block(1, 16),
            *block(16, 32),
            nn.Flatten(),
            nn.Linear(1568, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    return timed_epoch(model, pixels, labels, CNN_BATCH)


def timed_epoch(model, pixels, labels, batch: int, normalise=lambda images, out: images) -> dict:
    """Wall and CPU seconds of one epoch of `model` over `pixels` in seeded batches of `batch`, fused Adam;
    each batch `normalise`d ahead as the train stage does (by default passed on as it is: uint8)."""
    import torch
    import torch.nn.functional as F

    from stages.core.distributed import SINGLE
    from stages.core.training import epoch_order, gathered, make_optimizer

    optimizer = make_optimizer("adam", model.parameters(), lr=0.005, momentum=0.0, weight_decay=0.0)
    batches = epoch_order(len(pixels), torch.Generator().manual_seed(0), torch.device("cpu")).split(batch)
    model.train()
    start, start_cpu = time.perf_counter(), cpu_seconds()
    for inputs, targets in gathered((pixels, labels), batches, SINGLE, normalise):
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"wall": time.perf_counter() - start, "cpu": cpu_seconds() - start_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--images", type=int, default=55000, help="images in the cnn epoch (Fashion-MNIST's train split)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"load average at the start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}, {args.threads} thread(s)")
    pinned = run_isolated(product_times, pinned=True, threads=args.threads, rounds=args.rounds)
    free = run_isolated(product_times, pinned=False, threads=args.threads, rounds=args.rounds)
    print(f"{'product (M, K, N)':45s} {'wall ms: pinned':>15s} {'torch':>7s} {'ratio':>6s}   {'CPU ms: pinned':>14s} "
          f"{'torch':>7s} {'ratio':>6s}  (pinned/torch, target <= 1.15)")  # fmt: skip
    for name, (_, shape) in PRODUCTS.items():
        (wall, cpu), (free_wall, free_cpu) = pinned[name], free[name]
        label = f"{name} {shape}"
        print(
            f"{label:45s} {wall * 1e3:15.3f} {free_wall * 1e3:7.3f} {wall / free_wall:5.2f}x   {cpu * 1e3:14.3f} "
            f"{free_cpu * 1e3:7.3f} {cpu / free_cpu:5.2f}x"
        )
    with recorded("matmul_pin") as figures:
        slowest = max(PRODUCTS, key=lambda name: pinned[name][1] / free[name][1])
        worst = pinned[slowest][1] / free[slowest][1]
        figures["slowest_product_cpu"] = ratio(SLOWEST_LABEL, worst, 2, "<= 1.15x", slowest)
        for index, clock in enumerate(("wall", "CPU")):
            total = sum(pinned[name][index] for name in PRODUCTS) / sum(free[name][index] for name in PRODUCTS)
            figures[f"all_products_{clock.lower()}"] = ratio(f"{ALL_LABEL}, {clock} time", total, 2)
        epoch = run_isolated(cnn_epoch, pinned=True, threads=args.threads, images=args.images)
        plain = run_isolated(cnn_epoch, pinned=False, threads=args.threads, images=args.images)
        print(f"cnn epoch ({args.images} images, batch {CNN_BATCH})")
        for clock in ("wall", "cpu"):
            detail = f"{epoch[clock]:.1f} / {plain[clock]:.1f} s"
            label = f"{CNN_LABEL}, {'wall-clock' if clock == 'wall' else 'CPU time'}"
            figures[f"cnn_epoch_{clock}"] = ratio(label, epoch[clock] / plain[clock], 2, "<= 1.0x", detail)
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
