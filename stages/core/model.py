"""The classifiers, and saving/loading them as safetensors weights plus a JSON model card.

A model takes uint8 images (B, H, W) and returns logits (B, classes): normalisation is its first step,
so the saved model is usable for inference with nothing but its two files.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import nn

from stages.core.artifacts import read_checked, read_tensors, write_json, write_tensors
from stages.core.errors import FileProblem, damaged
from stages.core.files import CARD, META, WEIGHTS
from stages.core.splits import Meta

# The card's JSON types: the keys and types are its writer's, the values its reader's business.
Numerics = dict[str, str | None]  # stages.numerics.settings(): what the CPU computed with
Recipe = dict[str, str | int | float | bool]  # TrainConfig.recipe(): what the weights depend on


class Architecture(BaseModel):
    """Enough to rebuild the network, written into the card."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: Literal["logreg", "mlp"]
    hidden: tuple[PositiveInt, ...]  # widths of the mlp's hidden layers; none for logreg
    image_shape: tuple[PositiveInt, PositiveInt]
    num_classes: int = Field(ge=2)
    mean: float
    std: float = Field(gt=0)

    @model_validator(mode="after")
    def _hidden_layers_fit_the_model(self) -> Architecture:
        if (self.model == "mlp") != bool(self.hidden):
            raise ValueError(f"{self.model} with hidden widths {list(self.hidden)}")
        return self


class Card(BaseModel):
    """model.json: what the model is, what it was trained on and how."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    architecture: Architecture
    classes: tuple[str, ...]
    dataset: str
    device: str  # the device it was trained on
    numerics: Numerics
    recipe: Recipe

    @model_validator(mode="after")
    def _one_name_per_output(self) -> Card:
        if len(self.classes) != self.architecture.num_classes:
            raise ValueError(
                f"{len(self.classes)} class names for {self.architecture.num_classes} outputs (num_classes)"
            )
        return self


class Classifier(nn.Module):
    """Normalise, flatten, then a linear layer (`logreg`) or a ReLU MLP (`mlp`)."""

    def __init__(self, architecture: Architecture) -> None:
        super().__init__()
        inputs = math.prod(architecture.image_shape)
        hidden = architecture.hidden if architecture.model == "mlp" else ()
        widths = [inputs, *hidden, architecture.num_classes]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
            if index:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(width_in, width_out))
        self.layers = nn.Sequential(*layers)
        # x_normalised = (pixel / 255 - mean) / std = pixel * scale + shift; not saved with the weights
        # (the card holds mean and std), so they are non-persistent buffers that follow .to(device).
        mean, std = architecture.mean, architecture.std
        self.register_buffer("scale", torch.tensor(1 / (255 * std)), persistent=False)
        self.register_buffer("shift", torch.tensor(-mean / std), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.flatten(1).float()  # (B, H, W) uint8 -> (B, H*W) float32 in 0..255
        # The first layer applied to normalised pixels, W (pixels * scale + shift) + b, computed as
        # (W pixels) * scale + (b + shift * W 1): the same function of the same parameters (so the same
        # training), without an elementwise pass over every pixel of the batch, the costliest step here.
        first = self.layers[0]
        bias = first.bias + self.shift * first.weight.sum(1)
        hidden = torch.nn.functional.linear(pixels, first.weight) * self.scale + bias  # (B, width)
        return self.layers[1:](hidden)  # (B, classes)


def architecture_for(model: Literal["logreg", "mlp"], hidden: tuple[int, ...], meta: Meta) -> Architecture:
    """The network of `model` for the processed data described by `meta`; a logreg has no hidden layers."""
    return Architecture(
        model=model,
        hidden=hidden if model == "mlp" else (),
        image_shape=meta.image_shape,
        num_classes=len(meta.classes),
        mean=meta.mean,
        std=meta.std,
    )


def init_model(architecture: Architecture, seed: int, device: torch.device) -> Classifier:
    """A new model with seeded initial weights, drawn on the CPU so that they are the same on every device."""
    torch.manual_seed(seed)
    return Classifier(architecture).to(device)


def save_model(folder: Path, model: nn.Module, card: Card) -> None:
    """Write the weights (from CPU tensors, so a GPU-trained model loads anywhere) and the card."""
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    write_tensors(folder / WEIGHTS, weights)
    write_json(folder / CARD, card.model_dump(mode="json"))


def load_model(folder: Path, device: torch.device | str = "cpu") -> tuple[Classifier, Card]:
    """Rebuild a saved model from its card and weights; safetensors runs no pickled code.

    Both files are checked against what `save_model` writes (the card's keys and types, one class name
    per output, every weight's name, dtype and shape), so a damaged or mismatched model is a FileProblem
    naming the file, never a model that evaluates "successfully".
    """
    card = read_checked(folder / CARD, Card, "card")
    model = Classifier(card.architecture)
    weights_path = folder / WEIGHTS
    weights = read_tensors(weights_path, "weights")
    expected = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in model.state_dict().items()}
    found = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in weights.items()}
    if found != expected:
        wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        first = wrong[0]
        problem = f"does not match {folder / CARD} ({first}: expected {expected.get(first)}, found {found.get(first)})"
        raise damaged(weights_path, problem, "weights")
    model.load_state_dict(weights)
    return model.to(device).eval(), card


def check_trained_for(card: Card, meta: Meta, model_folder: Path, data_folder: Path) -> None:
    """Refuse a model trained for other classes or image sizes than the processed data has."""
    if card.classes != meta.classes or card.architecture.image_shape != meta.image_shape:
        problem = (
            f"trained for other data ({len(card.classes)} classes, images {card.architecture.image_shape}) "
            f"than {data_folder / META} ({len(meta.classes)} classes, images {meta.image_shape})"
        )
        raise FileProblem(model_folder / CARD, problem, artifact="card", kind="outdated")
