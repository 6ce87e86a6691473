"""Stage `preprocess`: decode the IDX files into train/val/test tensors in `data/processed/`.

Images stay uint8 (N, H, W) and labels int64 (N,), saved with safetensors: loading runs no pickled code,
and the same input gives the same bytes in every process (torch.save embeds a random id, which would
make DVC rerun everything downstream). The normalisation statistics, computed on the training split
only, are stored beside the tensors in `meta.json`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.artifacts import atomic_directory, read_json, write_json
from stages.cli import StageError, argument_parser, run
from stages.datasets import ROLES
from stages.idx import read_split
from stages.params import Params, load_section, require
from stages.splits import META, save_split


class PreprocessParams(Params):
    """`preprocess`: how the training set is split into train and validation."""

    val_size: int  # images held out of the training set for validation
    seed: int

    def check(self) -> None:
        require(self.val_size >= 1, "preprocess.val_size", "must be >= 1")


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="folder written by the download stage")
    parser.add_argument("--out", type=Path, required=True, help="folder for the split tensors")
    args = parser.parse_args()
    params = load_section(args.params, "preprocess", PreprocessParams)

    manifest_path = args.raw / "dataset.json"
    if not manifest_path.exists():
        raise StageError(f"{manifest_path}: missing; run the download stage first (dvc repro download)")
    manifest = read_manifest(manifest_path)
    classes = manifest["classes"]
    files = {role: args.raw / name for role, name in manifest["files"].items()}
    train_images, train_labels = read_split(files["train_images"], files["train_labels"], len(classes))
    test_images, test_labels = read_split(files["test_images"], files["test_labels"], len(classes))
    if train_images.shape[1:] != test_images.shape[1:]:
        raise StageError(
            f"{files['test_images']}: images are {tuple(test_images.shape[1:])}, "
            f"the training images {tuple(train_images.shape[1:])}"
        )

    splits = split_train_val(train_images, train_labels, params.val_size, params.seed)
    splits["test"] = (test_images, test_labels)
    mean, std = pixel_statistics(splits["train"][0])
    meta = {
        "dataset": manifest["dataset"],
        "classes": classes,
        "image_shape": list(train_images.shape[1:]),
        "sizes": {name: len(images) for name, (images, _) in splits.items()},
        # Of pixel values scaled to [0, 1], over the training split only (val and test stay unseen).
        "mean": mean,
        "std": std,
    }
    with atomic_directory(args.out) as folder:
        for name, (images, labels) in splits.items():
            save_split(folder, name, images, labels)
        write_json(folder / META, meta)


def read_manifest(path: Path) -> dict:
    """The download stage's dataset.json: dataset name, class names and the file of each role."""
    fix = "rerun the download stage (dvc repro --force download)"
    try:
        manifest = read_json(path)
        files = manifest["files"]
        complete = isinstance(manifest["classes"], list) and all(role in files for role in ROLES)
    except (ValueError, KeyError, TypeError):
        raise StageError(f"{path}: damaged (not the JSON the download stage writes); {fix}") from None
    if not complete or not isinstance(manifest.get("dataset"), str):
        raise StageError(f"{path}: incomplete (needs dataset, classes and files {', '.join(ROLES)}); {fix}")
    return manifest


def split_train_val(
    images: torch.Tensor, labels: torch.Tensor, val_size: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Hold out `val_size` images, chosen by a seeded permutation; both splits keep the file's order."""
    if val_size >= len(images):
        raise StageError(
            f"preprocess.val_size: {val_size} is not smaller than the training set ({len(images)} images); lower it"
        )
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    val_index, train_index = order[:val_size].sort().values, order[val_size:].sort().values
    return {
        "train": (images[train_index], labels[train_index]),
        "val": (images[val_index], labels[val_index]),
    }


def pixel_statistics(images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of all pixels scaled to [0, 1], computed in float64."""
    pixels = images.to(torch.float64).div_(255)
    return round(pixels.mean().item(), 8), round(pixels.std().item(), 8)


if __name__ == "__main__":
    run(main)
