"""The processed dataset on disk: one safetensors file per split plus `meta.json`, shared by three stages.

Readers check every file against what the preprocess stage promises (the keys, dtypes and shapes below,
and labels within the classes of `meta.json`), so a damaged or hand-edited file is a StageError naming
it, not a traceback or, worse, a silently wrong result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from stages.artifacts import write_tensors
from stages.cli import StageError
from stages.runtime import to_device

META = "meta.json"
REBUILD = "rerun the preprocess stage: dvc repro --force preprocess"


class Meta(BaseModel):
    """What the preprocess stage writes into meta.json."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    dataset: str
    classes: tuple[str, ...] = Field(min_length=2)
    image_shape: tuple[PositiveInt, PositiveInt]
    sizes: dict[str, PositiveInt]
    mean: float
    std: float = Field(gt=0)


def save_split(folder: Path, name: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """uint8 images (N, H, W) and int64 labels (N,); safetensors gives the same bytes for the same tensors."""
    write_tensors(folder / f"{name}.safetensors", {"images": images.contiguous(), "labels": labels.contiguous()})


def load_split(folder: Path, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (N, H, W) uint8 and labels (N,) int64 of one split, checked against meta.json."""
    meta = read_meta(folder)
    path = folder / f"{name}.safetensors"
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise StageError(f"{path}: missing; run the preprocess stage first (dvc repro preprocess)") from None
    except (SafetensorError, OSError) as error:
        raise StageError(f"{path}: not a safetensors file ({error}); {REBUILD}") from None
    images, labels = check_split(path, tensors, meta)
    return to_device(images, device), to_device(labels, device)


def check_split(path: Path, tensors: dict[str, torch.Tensor], meta: Meta) -> tuple[torch.Tensor, torch.Tensor]:
    """Refuse a split that is not what save_split writes for this meta.json."""
    if set(tensors) != {"images", "labels"}:
        raise StageError(f"{path}: holds {sorted(tensors)}, expected ['images', 'labels']; {REBUILD}")
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
        raise StageError(f"{path}: {problem}; {REBUILD}")
    return images, labels


def read_meta(folder: Path) -> Meta:
    path = folder / META
    try:
        return Meta.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise StageError(f"{path}: missing; run the preprocess stage first (dvc repro preprocess)") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(map(str, first["loc"])) or "the file"
        raise StageError(f"{path}: damaged ({where}: {first['msg']}); {REBUILD}") from None


def load_meta(folder: Path) -> dict[str, Any]:
    """meta.json, checked, as the plain dict the stages pass on (lists, as it was written)."""
    return read_meta(folder).model_dump(mode="json")
