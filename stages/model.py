"""The classifiers, and saving/loading them as safetensors weights plus a JSON model card.

A model takes uint8 images (B, H, W) and returns logits (B, classes): normalisation is its first step,
so the saved model is usable for inference with nothing but its two files. Anything else (float pixels,
another image size, a single H x W image) is refused with stages.contract's ImageInputError, which says
how to convert.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from stages.artifacts import write_json, write_tensors
from stages.cli import StageError
from stages.contract import CARD, REBUILD, WEIGHTS, check_images, load_card

TRAINING_LOG = "training"  # DVCLive's folder: curves and summary


class Classifier(nn.Module):
    """Normalise, flatten, then a linear layer (`logreg`) or a ReLU MLP (`mlp`). `build_model` picks the class."""

    def __init__(self, architecture: dict[str, Any]) -> None:
        super().__init__()
        inputs = math.prod(architecture["image_shape"])
        widths = [inputs, *architecture["hidden"], architecture["num_classes"]]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
            if index:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(width_in, width_out))
        self.layers = nn.Sequential(*layers)
        self.image_shape = tuple(architecture["image_shape"])
        # x_normalised = (pixel / 255 - mean) / std = pixel * scale + shift; not saved with the weights
        # (the card holds mean and std), so they are non-persistent buffers that follow .to(device).
        mean, std = architecture["mean"], architecture["std"]
        self.register_buffer("scale", torch.tensor(1 / (255 * std)), persistent=False)
        self.register_buffer("shift", torch.tensor(-mean / std), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.image_shape)
        pixels = images.flatten(1).float()  # (B, H, W) uint8 -> (B, H*W) float32 in 0..255
        # The first layer applied to normalised pixels, W (pixels * scale + shift) + b, computed as
        # (W pixels) * scale + (b + shift * W 1): the same function of the same parameters (so the same
        # training), without an elementwise pass over every pixel of the batch, the costliest step here.
        first = self.layers[0]
        bias = first.bias + self.shift * first.weight.sum(1)
        hidden = torch.nn.functional.linear(pixels, first.weight) * self.scale + bias  # (B, width)
        return self.layers[1:](hidden)  # (B, classes)


class ConvNet(nn.Module):
    """`cnn`: normalise, then per width in `channels` a 3x3 convolution, batch norm, ReLU and 2x2 max-pool,
    then the ReLU MLP of `hidden` widths over the flattened maps.

    No dropout: its masks come from the device's generator, so a GPU run would train another model than a
    CPU run. Batch norm instead regularises, and lets a higher learning rate converge in few epochs.
    """

    def __init__(self, architecture: dict[str, Any]) -> None:
        super().__init__()
        height, width = architecture["image_shape"]
        layers: list[nn.Module] = []
        channels_in = 1
        for channels in architecture["channels"]:
            # bias=False: the batch norm's shift right after it would make a bias redundant.
            layers += [nn.Conv2d(channels_in, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)]
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            channels_in, height, width = channels, height // 2, width // 2
        self.features = nn.Sequential(*layers)
        widths = [channels_in * height * width, *architecture["hidden"], architecture["num_classes"]]
        head: list[nn.Module] = [nn.Flatten()]
        for index, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
            if index:
                head.append(nn.ReLU())
            head.append(nn.Linear(width_in, width_out))
        self.head = nn.Sequential(*head)
        self.image_shape = tuple(architecture["image_shape"])
        mean, std = architecture["mean"], architecture["std"]
        self.register_buffer("scale", torch.tensor(1 / (255 * std)), persistent=False)
        self.register_buffer("shift", torch.tensor(-mean / std), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.image_shape)
        # (B, H, W) uint8 -> (B, 1, H, W) normalised float32; one elementwise pass, small next to the convolutions.
        pixels = images.unsqueeze(1).float() * self.scale + self.shift
        return self.head(self.features(pixels))  # (B, classes)


def build_model(architecture: dict[str, Any]) -> nn.Module:
    """The network an architecture (as `architecture_for` writes it) describes, with fresh weights."""
    return ConvNet(architecture) if architecture["model"] == "cnn" else Classifier(architecture)


def architecture_for(
    model: str, hidden: tuple[int, ...], meta: dict[str, Any], channels: tuple[int, ...] = ()
) -> dict[str, Any]:
    """Everything needed to rebuild the model, from the train params and the processed data's meta.

    `channels` appears for the cnn only, so the cards of the linear models keep their bytes.
    """
    architecture = {
        "model": model,
        "hidden": list(hidden) if model in ("mlp", "cnn") else [],
        "image_shape": meta["image_shape"],
        "num_classes": len(meta["classes"]),
        "mean": meta["mean"],
        "std": meta["std"],
    }
    if model == "cnn":
        architecture["channels"] = list(channels)
    return architecture


def save_model(folder: Path, model: nn.Module, card: dict[str, Any]) -> None:
    """Write the weights (from CPU tensors, so a GPU-trained model loads anywhere) and the card."""
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    write_tensors(folder / WEIGHTS, weights)
    write_json(folder / CARD, card)


def load_model(folder: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model from its card and weights; safetensors runs no pickled code.

    Both files are checked against what `save_model` writes (the card's keys and types, one class name
    per output, every weight's name, dtype and shape), so a damaged or mismatched model is a StageError
    naming the file, never a model that evaluates "successfully".
    """
    card = load_card(folder / CARD)
    model = build_model(card.architecture.model_dump(exclude_defaults=True))
    weights_path = folder / WEIGHTS
    try:
        weights = load_file(str(weights_path))
    except FileNotFoundError:
        raise StageError(f"{weights_path}: missing; {REBUILD}") from None
    except (SafetensorError, OSError) as error:
        raise StageError(f"{weights_path}: not a safetensors file ({error}); {REBUILD}") from None
    expected = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in model.state_dict().items()}
    found = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in weights.items()}
    if found != expected:
        wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        raise StageError(
            f"{weights_path}: does not match {folder / CARD} ({wrong[0]}: expected {expected.get(wrong[0])}, "
            f"found {found.get(wrong[0])}); {REBUILD}"
        )
    model.load_state_dict(weights)
    return model.to(device).eval(), card.model_dump(mode="json", exclude_defaults=True)
