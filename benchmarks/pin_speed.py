"""The op-level pin's price: plain torch.nn networks trained under `pinned_cpu` against the same networks in
plain PyTorch (torch's defaults, nothing pinned), same run, same machine.

Run by hand, never in CI (no data needed):

    python -m benchmarks.pin_speed [--threads 1 2] [--images 55000] [--rounds 3]

(1) the cnn recipe's architecture as plain torch.nn (3x3 convolution, 2x2 max-pool, batch norm and ReLU
    blocks of widths 16 and 32, then an MLP head of 256): one epoch, batch 128, Adam (target <= 1.0x);
(2) a user's network (a 5x5 stride-2 convolution, a grouped convolution, a linear head): one epoch, batch
    128, Adam (target <= 1.2x).
Pinned: `import stages` first (the environment pin), products on `--threads` threads, inside
`stages.core.pinning.pinned_cpu` as `fit` runs it. Plain: torch loaded with nothing pinned, torch's own
kernels on `--threads` threads. Both train on the same random images of Fashion-MNIST's size, same batches.
Each run is a fresh process; the variants alternate, `--rounds` times, and each variant's fastest run counts.
"""

from __future__ import annotations

import argparse
import os

from benchmarks.isolated import run_isolated
from benchmarks.matmul_pin import timed_epoch
from benchmarks.results import ratio, recorded

BATCH = 128
NETWORKS = ("cnn", "user network")
TARGETS = {"cnn": 1.0, "user network": 1.2}
# What steers the kernels of torch and numpy: the plain variant clears it, so that each library chooses.
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OPENBLAS_CORETYPE")


def build(name: str):
    """The network `name`, as plain torch.nn taking uint8 images (B, 28, 28)."""
    import torch
    from torch import nn

    class Normalise(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return images.unsqueeze(1).float() * (1 / (255 * 0.35)) - 0.29 / 0.35  # (B, 1, 28, 28)

    if name == "cnn":

        def block(channels_in: int, channels_out: int) -> list[nn.Module]:
            conv = nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)
            return [conv, nn.MaxPool2d(2), nn.BatchNorm2d(channels_out), nn.ReLU()]

        layers = [*block(1, 16), *block(16, 32), nn.Flatten(), nn.Linear(1568, 256), nn.ReLU(), nn.Linear(256, 10)]
    else:
        layers = [
            nn.Conv2d(1, 32, 5, stride=2, padding=2),  # (B, 32, 14, 14)
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1, groups=4),  # (B, 64, 7, 7)
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 49, 10),
        ]
    return nn.Sequential(Normalise(), *layers)


def epoch(name: str, pinned: bool, threads: int, images: int) -> dict:
    """Seconds (wall and CPU) for one epoch of `name`, pinned or plain."""
    if pinned:
        import stages  # noqa: F401  (the environment pin, before torch loads)
    else:
        for variable in KERNEL_VARIABLES:
            os.environ.pop(variable, None)
    import contextlib

    import torch

    from stages.core.pinning import pinned_cpu
    from stages.core.runtime import make_deterministic, set_cpu_threads

    make_deterministic()
    if pinned:
        set_cpu_threads(threads)
    else:
        torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (images, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (images,), generator=generator)
    torch.manual_seed(0)
    model = build(name)
    with pinned_cpu() if pinned else contextlib.nullcontext():
        return timed_epoch(model, pixels, labels, BATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=55000, help="images per epoch (Fashion-MNIST's train split)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    args = parser.parse_args()
    print(f"load average at the start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    best: dict[tuple[str, int, bool], dict] = {}
    for _ in range(args.rounds):
        for name in args.networks:
            for threads in args.threads:
                for pinned in (True, False):
                    result = run_isolated(epoch, name=name, pinned=pinned, threads=threads, images=args.images)
                    key = (name, threads, pinned)
                    if key not in best or result["wall"] < best[key]["wall"]:
                        best[key] = result
    print(f"one epoch, {args.images} images, batch {BATCH}; fastest of {args.rounds} alternated runs each")
    with recorded("pin_speed") as figures:
        for name in args.networks:
            for threads in args.threads:
                pin, plain = best[(name, threads, True)], best[(name, threads, False)]
                print(
                    f"{name:13s} {threads} thread(s): pinned {pin['wall']:6.2f} s ({pin['cpu']:6.2f} CPU s), "
                    f"plain PyTorch {plain['wall']:6.2f} s ({plain['cpu']:6.2f} CPU s): "
                    f"{pin['cpu'] / plain['cpu']:.2f}x CPU"
                )
                figures[f"{name.replace(' ', '_')}_{threads}_threads"] = ratio(
                    f"{name} epoch pinned / plain PyTorch, {threads} thread(s)",
                    pin["wall"] / plain["wall"],
                    2,
                    f"<= {TARGETS[name]}x",
                    f"{pin['wall']:.2f} / {plain['wall']:.2f} s",
                )


if __name__ == "__main__":
    main()
