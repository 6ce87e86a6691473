"""The processed dataset on disk: one safetensors file per split plus `meta.json`, shared by three stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from stages.artifacts import read_json, write_tensors
from stages.cli import StageError
from stages.runtime import to_device

META = "meta.json"


def save_split(folder: Path, name: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """uint8 images (N, H, W) and int64 labels (N,); safetensors gives the same bytes for the same tensors."""
    write_tensors(folder / f"{name}.safetensors", {"images": images.contiguous(), "labels": labels.contiguous()})


def load_split(folder: Path, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    path = folder / f"{name}.safetensors"
    if not path.exists():
        raise StageError(f"{path}: missing; run the preprocess stage first (dvc repro preprocess)")
    tensors = load_file(str(path))
    return to_device(tensors["images"], device), to_device(tensors["labels"], device)


def load_meta(folder: Path) -> dict[str, Any]:
    path = folder / META
    if not path.exists():
        raise StageError(f"{path}: missing; run the preprocess stage first (dvc repro preprocess)")
    return read_json(path)
