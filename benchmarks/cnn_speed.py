"""The cnn against pytorch/examples' mnist/main.py, on the real Fashion-MNIST, same run, same machine.

Run by hand after `dvc repro preprocess` (it reads data/raw and data/processed), never in CI:

    python -m benchmarks.cnn_speed [--example-epochs 3] [--threads 2] [--device cuda] [--precision bf16]

(a) pytorch/examples mnist/main.py as published: its Net (two 3x3 convolutions, max-pool, dropout, two
    linear layers), torchvision's FashionMNIST through a DataLoader of batch 64 with ToTensor and
    Normalize((0.1307,), (0.3081,)), Adadelta lr 1.0, StepLR gamma 0.7 per epoch, seed 1, no shuffle on the
    CPU (its `shuffle=True` is in the accelerator-only kwargs); test accuracy after each epoch.
(b) this project's cnn recipe (params.yaml's train section with the README's cnn one-liner applied), through
    `stages.core.training.fit`; test accuracy after each epoch, outside the timing.
(c) the same Net as (a) trained the project's way (uint8 tensors in memory, index_select batches, the
    normalisation in the model, fused Adam), one epoch, against its compute floor: 72 MFLOP per image for
    forward and backward, 55,000 images, at this machine's fp32 matmul rate measured here.

Ratios: (a) time to 0.91 test accuracy / (b) time to 0.91 (target >= 5); (c) epoch / floor (target <= 1.5).
On CUDA, (a) uses the example's accelerator settings (shuffle, one loader worker, pinned memory) and stays
fp32 as published; --precision sets (b)'s and (c)'s autocast and the matmul rate (c) is measured at.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.isolated import run_isolated
from benchmarks.results import ratio, recorded

TARGET = 0.91
RAW = Path("data/raw")
PROCESSED = Path("data/processed")
NET_FLOP = 72e6  # forward + backward of the example's Net, per image (README, Models)
# What each ratio is, as the tables of the README and docs/speed.md name it (benchmarks/figures.py).
TIME_LABEL = f"pytorch/examples' mnist time to {TARGET} test accuracy / the cnn's"
FLOOR_LABEL = "the example's Net trained the project's way, epoch / its compute floor"
MEMORY_LABEL = "the cnn's peak memory / pytorch/examples' mnist"


def example_net():
    from torch import nn
    from torch.nn import functional as F

    class Net(nn.Module):
        """pytorch/examples mnist/main.py's Net, as published (log_softmax output, for nll_loss)."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3, 1)
            self.conv2 = nn.Conv2d(32, 64, 3, 1)
            self.dropout1 = nn.Dropout(0.25)
            self.dropout2 = nn.Dropout(0.5)
            self.fc1 = nn.Linear(9216, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            x = F.relu(self.conv1(x))  # (B, 32, 26, 26)
            x = F.relu(self.conv2(x))  # (B, 64, 24, 24)
            x = self.dropout1(F.max_pool2d(x, 2)).flatten(1)  # (B, 9216)
            x = self.dropout2(F.relu(self.fc1(x)))
            return F.log_softmax(self.fc2(x), dim=1)

    return Net()


def example(epochs: int, threads: int, device: str) -> dict:
    """(a) The published loop: DataLoader over per-image PIL -> ToTensor -> Normalize."""
    import torch
    import torch.nn.functional as F
    from torch.optim.lr_scheduler import StepLR
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.set_num_threads(threads)
    torch.manual_seed(1)
    with tempfile.TemporaryDirectory() as root:
        raw = Path(root) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for split in ("train", "t10k"):
            for kind in ("images-idx3", "labels-idx1"):
                shutil.copy(RAW / f"{split}-{kind}-ubyte", raw / f"{split}-{kind}-ubyte")
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        train = datasets.FashionMNIST(root, train=True, download=False, transform=transform)
        test = datasets.FashionMNIST(root, train=False, download=False, transform=transform)
        accelerator = {"num_workers": 1, "pin_memory": True, "shuffle": True} if device != "cpu" else {}
        train_loader = DataLoader(train, batch_size=64, **accelerator)
        test_loader = DataLoader(test, batch_size=1000, **accelerator)
        model = example_net().to(device)
        optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
        scheduler = StepLR(optimizer, step_size=1, gamma=0.7)
        elapsed, curve, reached = 0.0, [], None
        for _ in range(epochs):
            start = time.perf_counter()
            model.train()
            for data, target in train_loader:
                data, target = data.to(device), target.to(device)
                optimizer.zero_grad()
                loss = F.nll_loss(model(data), target)
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                correct = sum(
                    (model(data.to(device)).argmax(1) == target.to(device)).sum().item() for data, target in test_loader
                )
            scheduler.step()
            elapsed += time.perf_counter() - start  # its test pass is part of its loop, as published
            curve.append(round(correct / len(test), 4))
            if reached is None and curve[-1] >= TARGET:
                reached = elapsed
    return {"epoch_s": elapsed / epochs, "to_target_s": reached, "curve": curve}


def project(threads: int, device: str, precision: str) -> dict:
    """(b) The cnn recipe through stages.core.training.fit; test accuracy per epoch, measured outside the clock."""
    import stages  # noqa: F401  (first: it pins the numerics before torch loads, as in a stage)

    # isort: split
    import torch

    from stages.core.metrics import predict, score
    from stages.core.model import architecture_for, init_model
    from stages.core.runtime import make_deterministic, resolve_threads, set_cpu_threads
    from stages.core.splits import load_split, read_meta
    from stages.core.training import fit
    from stages.params import parse_section, read_params_file
    from stages.train import TrainParams
    from tests.helpers import RECIPES

    run = {"threads": threads, "device": device, "precision": precision}
    recipe = RECIPES["cnn"][0]  # the README's one-liner
    params = parse_section("train", read_params_file(Path("params.yaml"))["train"] | recipe | run, TrainParams)
    make_deterministic(params.tf32)
    set_cpu_threads(resolve_threads(params.threads))
    on = torch.device(device)
    meta = read_meta(PROCESSED)
    train_set, val_set = load_split(PROCESSED, "train", on), load_split(PROCESSED, "val", on)
    test_images, test_labels = load_split(PROCESSED, "test", on)
    model = init_model(architecture_for(params.model, params.hidden, meta, params.channels), params.seed, on)
    curve, times, clock = [], [], {"elapsed": 0.0, "start": time.perf_counter()}

    def after_epoch(log) -> None:
        synchronize(on)
        clock["elapsed"] += time.perf_counter() - clock["start"]
        times.append(clock["elapsed"])
        curve.append(round(score(predict(model, test_images), test_labels).accuracy, 4))  # off the clock
        clock["start"] = time.perf_counter()

    fit(model, train_set, val_set, params.fit_config(), report=after_epoch)
    reached = next((t for t, accuracy in zip(times, curve, strict=True) if accuracy >= TARGET), None)
    return {"epoch_s": times[-1] / len(times), "to_target_s": reached, "curve": curve}


def synchronize(device) -> None:
    """Wait for the GPU's queued work, so that the clock measures it (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor(threads: int, device: str, precision: str) -> dict:
    """(c) The example's Net trained the project's way for one epoch, and this machine's matmul rate."""
    import torch
    import torch.nn.functional as F

    from stages.core.runtime import autocast_for, make_deterministic, set_cpu_threads
    from stages.core.splits import load_split, read_meta
    from stages.core.training import epoch_order, make_optimizer

    make_deterministic()
    set_cpu_threads(threads)
    on = torch.device(device)
    # The matmul rate at the precision trained in; large enough to reach the device's peak.
    size = 2048 if on.type == "cpu" else 8192
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, device=on, dtype=dtype), torch.randn(size, size, device=on, dtype=dtype)
    a @ b
    runs = []
    for _ in range(5):
        synchronize(on)
        start = time.perf_counter()
        a @ b
        synchronize(on)
        runs.append(time.perf_counter() - start)
    rate = 2 * size**3 / min(runs)  # FLOP/s

    meta = read_meta(PROCESSED)
    images, labels = load_split(PROCESSED, "train", on)
    torch.manual_seed(0)
    net = example_net().to(on)
    scale, shift = 1 / (255 * meta.std), -meta.mean / meta.std
    optimizer = make_optimizer("adam", net.parameters(), lr=1e-3, momentum=0.0, weight_decay=0.0)
    order = epoch_order(len(images), torch.Generator().manual_seed(0), on)
    net.train()
    synchronize(on)
    start = time.perf_counter()
    for batch in order.split(128):
        inputs = images.index_select(0, batch).unsqueeze(1).float() * scale + shift
        with autocast_for(on, precision):
            loss = F.nll_loss(net(inputs).float(), labels.index_select(0, batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(on)
    epoch_s = time.perf_counter() - start
    return {"epoch_s": epoch_s, "floor_s": NET_FLOP * len(images) / rate, "gflops": rate / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="(b) and (c) only")
    args = parser.parse_args()
    if not (PROCESSED / "train.safetensors").exists() or not (RAW / "dataset.json").exists():
        sys.exit("run `dvc repro preprocess` first: this reads data/raw and data/processed")
    print(f"load average at the start: {', '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
    on = {"threads": args.threads, "device": args.device}
    print(f"device {args.device}, (b) and (c) in {args.precision}")
    # --example-epochs 0 skips (a), for a second precision on the same machine.
    a = run_isolated(example, epochs=args.example_epochs, **on) if args.example_epochs else None
    b = run_isolated(project, precision=args.precision, **on)
    c = run_isolated(floor, precision=args.precision, **on)
    for name, r in (("(a) pytorch/examples", a), ("(b) project cnn", b)):
        if r is None:
            continue
        to_target = f"{r['to_target_s']:.1f} s" if r["to_target_s"] is not None else "not reached"
        print(
            f"{name:22s} {r['epoch_s']:6.1f} s/epoch, {TARGET} after {to_target}; test accuracy per epoch {r['curve']}"
        )
    print(
        f"(c) the example's Net, the project's way: {c['epoch_s']:.1f} s/epoch; compute floor {c['floor_s']:.1f} s "
        f"(72 MFLOP x 55,000 images at {c['gflops']:.0f} GFLOP/s: a square {args.precision} matmul on {args.device})"
    )
    with recorded("cnn_speed") as figures:
        if a is not None and a["to_target_s"] and b["to_target_s"]:
            detail = f"{a['to_target_s']:.1f} / {b['to_target_s']:.1f} s"
            figures["time_to_target"] = ratio(TIME_LABEL, a["to_target_s"] / b["to_target_s"], 1, ">= 5x", detail)
        elif a is not None:
            print(f"time to {TARGET}, (a)/(b): not comparable, a variant did not reach {TARGET}")
        detail = f"{c['epoch_s']:.1f} / {c['floor_s']:.1f} s"
        figures["epoch_over_floor"] = ratio(FLOOR_LABEL, c["epoch_s"] / c["floor_s"], 2, "<= 1.5x", detail)
        if a is not None:
            detail = f"{b['peak_mb']:,.0f} / {a['peak_mb']:,.0f} MB"
            figures["peak_memory"] = ratio(MEMORY_LABEL, b["peak_mb"] / a["peak_mb"], 2, "<= 1x", detail)
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(json.dumps({"example": a, "project": b, "floor": c}))


if __name__ == "__main__":
    main()
