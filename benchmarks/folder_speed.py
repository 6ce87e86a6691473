"""How fast the download stage acquires a folder of pictures: Fashion-MNIST written as an ImageFolder of PNGs.

Run by hand, never in CI, from the project root (needs Debian's dataset-fashion-mnist):

    python -m benchmarks.folder_speed [--count 70000]

Each variant runs in a fresh process (benchmarks/isolated.py) on the same files, warm in the page cache:
- decode: PIL opens and decodes every picture, one CPU: the floor any PNG route pays;
- acquire, 1 CPU: `stages.core.folders.frame_pictures` (read, sha256, decode, frame) pinned to one CPU;
- acquire, all CPUs: the same as the stage runs it (a process per CPU).
Pictures per second for each, and each against decode.
"""

from __future__ import annotations

import argparse
import gzip
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.isolated import run_isolated
from benchmarks.results import figure, recorded
from stages.core.folders import FOLDER_FRAME, find_classes, frame_pictures, list_pictures

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
TARGET = 5000  # pictures per second on 2 cores


def write_folder(root: Path, count: int) -> None:
    """The first `count` pictures of Fashion-MNIST (train, then test) as root/train/<class>/<index>.png."""
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = np.frombuffer(
            gzip.decompress((DEBIAN / f"{prefix}-images-idx3-ubyte.gz").read_bytes()), np.uint8, -1, 16
        )
        labels = np.frombuffer(
            gzip.decompress((DEBIAN / f"{prefix}-labels-idx1-ubyte.gz").read_bytes()), np.uint8, -1, 8
        )
        images = images.reshape(-1, 28, 28)[:count]
        for index, (image, label) in enumerate(zip(images, labels, strict=False)):
            folder = root / split / f"class {label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:05d}.png")
        count -= len(images)
        if count <= 0:
            return


def pictures_of(root: Path) -> list[tuple[str, int]]:
    return [p for split in ("train", "test") if (root / split).is_dir()
            for p in list_pictures(root, split, find_classes(root / split))[0]]  # fmt: skip


def decode(root: str) -> dict:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    pictures = pictures_of(Path(root))
    started = time.perf_counter()
    for file, _ in pictures:
        with Image.open(Path(root) / file) as picture:
            picture.load()
    return {"pictures": len(pictures), "seconds": time.perf_counter() - started}


def acquire(root: str, one_cpu: bool) -> dict:
    if one_cpu:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    pictures = pictures_of(Path(root))
    started = time.perf_counter()
    frame_pictures(Path(root), pictures, FOLDER_FRAME, None)
    return {"pictures": len(pictures), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=70000, help="pictures to write (default: all 70,000)")
    count = parser.parse_args().count
    with tempfile.TemporaryDirectory() as temp:
        write_folder(Path(temp), count)
        baseline = run_isolated(decode, root=temp)
        rows = {
            "decode, 1 CPU": baseline,
            "acquire, 1 CPU": run_isolated(acquire, root=temp, one_cpu=True),
            f"acquire, {len(os.sched_getaffinity(0))} CPUs": run_isolated(acquire, root=temp, one_cpu=False),
        }
    base_rate = baseline["pictures"] / baseline["seconds"]
    print(f"{count:,} pictures; target {TARGET:,}/s for acquire on 2 CPUs")
    for name, result in rows.items():
        rate = result["pictures"] / result["seconds"]
        print(f"{name:<18} {rate:>9,.0f} pictures/s  {rate / base_rate:5.2f}x decode  {result['peak_mb']:.0f} MB peak")
    with recorded("folder_speed") as figures:
        for name, result in rows.items():
            rate = result["pictures"] / result["seconds"]
            target = f">= {TARGET:,} pictures/s" if name.startswith("acquire") and not name.endswith("1 CPU") else None
            detail = f"{rate / base_rate:.2f}x decode, {result['peak_mb']:.0f} MB peak, {count:,} pictures"
            figures[name.replace(", ", "_").replace(" ", "_")] = figure(
                f"{name}, pictures/s", round(rate), f"{rate:,.0f}", target, detail
            )


if __name__ == "__main__":
    main()
