"""Reading IDX files (the MNIST format) into tensors, checking every field of the header.

torchvision has a reader (`torchvision.datasets.mnist.read_sn3_pascalvincent_tensor`), but it checks with
bare asserts that do not name the file, and importing torchvision costs the stage about 3 s of start-up;
the format is small enough to parse here with the checks a user needs. It is parsed with numpy, so that
`stages.commands.predict` reads IDX files without importing torch; the stages take tensors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.core.datasets import Manifest
from stages.core.errors import FileProblem, damaged, missing

if TYPE_CHECKING:
    import torch

UNSIGNED_BYTE = 0x08  # the only element type MNIST-family files use
GZIP_MAGIC = b"\x1f\x8b"
ROLE = {1: "labels: count", 2: "one image: height, width", 3: "images: count, height, width"}


def read_idx(path: Path, dimensions: int) -> torch.Tensor:
    """Return the uint8 tensor stored in IDX file `path`, which must have `dimensions` dimensions."""
    import torch

    return torch.from_numpy(read_idx_array(path, dimensions))


def read_idx_array(path: Path, dimensions: int) -> np.ndarray:
    """`read_idx` as a numpy array."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise missing(path, "raw") from None
    # Raw files were verified when downloaded, so a defect means they were changed since, or a registered
    # dataset is itself broken: "damaged" either way (fetch them again).
    if data[:2] == GZIP_MAGIC:
        raise damaged(path, "still gzip-compressed, not an IDX file", "raw")
    if len(data) < 4:
        raise damaged(path, f"not an IDX file (only {len(data)} bytes)", "raw")
    zero, element_type, ndim = int.from_bytes(data[0:2], "big"), data[2], data[3]
    if zero != 0 or element_type != UNSIGNED_BYTE:
        raise damaged(
            path,
            f"bad IDX magic number 0x{data[:4].hex()}; expected 0x0000080{dimensions} "
            f"(unsigned bytes, {dimensions} dimensions)",
            "raw",
        )
    if ndim != dimensions:
        problem = (
            f"IDX file has {ndim} dimensions, expected {dimensions} ({ROLE[dimensions]}); "
            "is it the right file of the pair?"
        )
        raise FileProblem(path, problem, artifact="raw", kind="inconsistent")
    header_size = 4 + 4 * dimensions
    if len(data) < header_size:
        raise damaged(path, f"IDX header truncated ({len(data)} bytes, needs {header_size})", "raw")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimensions)]
    expected = header_size + math.prod(shape)
    if len(data) != expected:
        defect = "truncated" if len(data) < expected else "trailing bytes"
        raise damaged(
            path,
            f"header says {'x'.join(map(str, shape))} values ({expected} bytes) "
            f"but the file has {len(data)} bytes ({defect})",
            "raw",
        )
    # bytearray: a writable buffer, which torch.from_numpy takes without a warning.
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=header_size).reshape(shape)


def read_split(images_path: Path, labels_path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split: uint8 images (N, H, W) and int64 labels (N,), checked against each other."""
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if len(images) != len(labels):
        problem = (
            f"{len(labels)} labels for {len(images)} images in {images_path.name}; "
            "the files belong to different datasets or one is damaged"
        )
        raise FileProblem(labels_path, problem, artifact="raw", kind="inconsistent")
    if len(labels) and int(labels.max()) >= num_classes:
        problem = (
            f"label {int(labels.max())} is outside the {num_classes} classes (0..{num_classes - 1}); "
            "the labels do not belong to this dataset's class list"
        )
        raise FileProblem(labels_path, problem, artifact="raw", kind="inconsistent")
    return images, labels.long()


def read_raw(folder: Path, manifest: Manifest) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The "train" and (when the manifest lists it) "test" splits of a downloaded folder."""
    files = {role: folder / name for role, name in manifest.files.items()}
    splits = {
        split: read_split(files[f"{split}_images"], files[f"{split}_labels"], len(manifest.classes))
        for split in ("train", "test")
        if f"{split}_images" in files
    }
    (train_images, _), (test_images, _) = splits["train"], splits.get("test", splits["train"])
    if train_images.shape[1:] != test_images.shape[1:]:
        problem = f"images are {tuple(test_images.shape[1:])}, the training images {tuple(train_images.shape[1:])}"
        raise FileProblem(files["test_images"], problem, artifact="raw", kind="inconsistent")
    return splits
