"""The processed dataset: the train/val/test split, one safetensors file per split plus `meta.json`.

Readers check every file against what `save_split` and `write_meta` write (the keys, dtypes and shapes
below, and labels within the classes of `meta.json`), so a damaged or hand-edited file is a FileProblem
naming it, not a traceback or, worse, a silently wrong result.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from stages.core.artifacts import read_checked, read_tensors, write_json, write_tensors
from stages.core.contract import FrameRecord
from stages.core.errors import SettingError, damaged
from stages.core.files import META, split_file
from stages.core.runtime import to_device

Split = tuple[torch.Tensor, torch.Tensor]  # uint8 images (N, H, W), int64 labels (N,)


class Meta(BaseModel):
    """meta.json: what the processed dataset holds, and its normalisation."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    dataset: str
    classes: tuple[str, ...] = Field(min_length=2)
    image_shape: tuple[PositiveInt, PositiveInt]
    sizes: dict[str, PositiveInt]
    # Of pixel values scaled to [0, 1], over the training split only (val and test stay unseen).
    mean: float
    std: float = Field(gt=0)
    frame: FrameRecord | None = None  # a folder of pictures: how they were framed (the download's manifest)


def split_train_val(images: torch.Tensor, labels: torch.Tensor, val_size: int | float, seed: int) -> dict[str, Split]:
    """Hold out `val_size` images (a count, or a fraction), chosen by a seeded permutation; both splits keep
    the file's order."""
    train, val = hold_out(images, labels, val_size, seed)
    return {"train": train, "val": val}


def share_of(size: int | float, total: int) -> int:
    """The images that `size` holds out of `total`: a count as it is, a fraction of `total` rounded up (as
    scikit-learn's train_test_split rounds `test_size`), so that a fraction never holds out none."""
    return size if isinstance(size, int) else math.ceil(size * total)


def hold_out(images: torch.Tensor, labels: torch.Tensor, size: int | float, seed: int) -> tuple[Split, Split]:
    """(the rest, `size` images (a count, or a fraction) chosen by a seeded permutation), both in the file's order."""
    count = share_of(size, len(images))
    if count >= len(images):
        given = f"{size}" if isinstance(size, int) else f"{size} ({count} images)"
        raise SettingError(f"{given} is not smaller than the training set ({len(images)} images); lower it")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:count].sort().values, order[count:].sort().values
    return (images[kept], labels[kept]), (images[held], labels[held])


def pixel_statistics(images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of all pixels scaled to [0, 1], computed in float64."""
    pixels = images.to(torch.float64).div_(255)
    return round(pixels.mean().item(), 8), round(pixels.std().item(), 8)


def describe(dataset: str, classes: tuple[str, ...], splits: dict[str, Split], frame: FrameRecord | None) -> Meta:
    """The meta.json of `splits` of `dataset`, normalised by the statistics of the "train" split."""
    mean, std = pixel_statistics(splits["train"][0])
    height, width = splits["train"][0].shape[1:]
    return Meta(
        dataset=dataset,
        classes=classes,
        image_shape=(height, width),
        sizes={name: len(images) for name, (images, _) in splits.items()},
        mean=mean,
        std=std,
        frame=frame,
    )


def save_split(folder: Path, name: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """uint8 images (N, H, W) and int64 labels (N,); safetensors gives the same bytes for the same tensors."""
    write_tensors(folder / split_file(name), {"images": images.contiguous(), "labels": labels.contiguous()})


def write_meta(folder: Path, meta: Meta) -> None:
    write_json(folder / META, meta.model_dump(mode="json", exclude_none=True))


def load_split(folder: Path, name: str, device: torch.device) -> Split:
    """The images (N, H, W) uint8 and labels (N,) int64 of one split, checked against meta.json."""
    meta = read_meta(folder)
    path = folder / split_file(name)
    images, labels = check_split(path, read_tensors(path, "processed"), meta)
    return to_device(images, device), to_device(labels, device)


def check_split(path: Path, tensors: dict[str, torch.Tensor], meta: Meta) -> Split:
    """Refuse a split that is not what save_split writes for this meta.json."""
    if set(tensors) != {"images", "labels"}:
        raise damaged(path, f"holds {sorted(tensors)}, expected ['images', 'labels']", "processed")
    images, labels = tensors["images"], tensors["labels"]
    height, width = meta.image_shape
    problem = None
    if images.dtype != torch.uint8 or labels.dtype != torch.int64:
        problem = f"dtypes {images.dtype}/{labels.dtype}, expected uint8 images and int64 labels"
    elif images.dim() != 3 or tuple(images.shape[1:]) != (height, width):
        problem = f"images of shape {tuple(images.shape)}, expected (N, {height}, {width}) as meta.json says"
    elif len(images) != meta.sizes.get(path.stem, len(images)):
        problem = f"{len(images)} images, meta.json says {meta.sizes[path.stem]}"
    elif labels.shape != (len(images),):
        problem = f"labels of shape {tuple(labels.shape)} for {len(images)} images"
    elif len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(meta.classes):
        problem = f"labels outside 0..{len(meta.classes) - 1} (meta.json has {len(meta.classes)} classes)"
    if problem:
        raise damaged(path, problem, "processed")
    return images, labels


def read_meta(folder: Path) -> Meta:
    return read_checked(folder / META, Meta, "processed")
