"""The classifier, and saving/loading it as safetensors weights plus a JSON model card.

A model takes uint8 images (B, H, W) and returns logits (B, classes): normalisation is its first step,
so the saved model is usable for inference with nothing but its two files (a network of the user's also
needs the file that defines it: stages/core/user_networks.py). Anything else (float pixels,
another image size, a single H x W image) is refused with stages.core.contract's ImageInputError, which
says how to convert. The card's types and the checks that need no torch are in stages/core/contract.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.core.artifacts import read_tensors, write_tensors
from stages.core.contract import (
    BUILT_IN,
    PREDICT_BATCH,
    Architecture,
    Card,
    check_images,
    check_weights,
    layer_widths,
    read_card,
    write_card,
)
from stages.core.errors import FileProblem
from stages.core.files import CARD, META, WEIGHTS
from stages.core.networks import CNN, MLP
from stages.core.splits import Meta
from stages.core.user_networks import (
    build_network,
    check_outputs,
    check_source,
    data_arguments,
    import_network,
    source_of,
)

MAPS_PREDICT_BATCH = 1024


class Normalised(nn.Module):
    """Any network, built-in or the user's, behind the saved model's interface: uint8 images (B, H, W) in,
    logits (B, classes) out. `net` receives float maps (B, 1, H, W), (pixel / 255 - mean) / std.

    `scale` and `shift` (pixel * scale + shift) are not saved with the weights (the card holds mean and std):
    non-persistent buffers, which follow .to(device).
    """

    def __init__(self, net: nn.Module, architecture: Architecture) -> None:
        super().__init__()
        self.net = net
        self.image_shape = architecture.image_shape
        mean, std = architecture.mean, architecture.std
        self.register_buffer("scale", torch.tensor(1 / (255 * std)), persistent=False)
        self.register_buffer("shift", torch.tensor(-mean / std), persistent=False)
        # Images per forward pass when only predicting: the maps of the cnn (and of a network of the user's)
        # take more memory per image than a linear model's, and a pass of 1024 images stays in the caches.
        self.predict_batch = PREDICT_BATCH if architecture.model in ("logreg", "mlp") else MAPS_PREDICT_BATCH

    def normalise(self, images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (B, H, W) -> float32 (B, 1, H, W), normalised (into `out` if given): the training loop calls
        it a batch ahead of the step, on a helper thread."""
        maps = images.unsqueeze(1)
        maps = maps.float() if out is None else out.copy_(maps)
        return maps.mul_(self.scale).add_(self.shift)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.image_shape)
        return self.net(self.normalise(images))  # (B, classes)


def architecture_for(
    model: str,
    hidden: tuple[int, ...],
    meta: Meta,
    channels: tuple[int, ...] = (),
    args: dict[str, Any] | None = None,
) -> Architecture:
    """The network of `model` for the processed data described by `meta`; a logreg has no hidden layers, and
    only the cnn has channels. A network of the user's is imported (from the working folder first) to
    record its source, and has only `args`."""
    data = {"image_shape": meta.image_shape, "num_classes": len(meta.classes), "mean": meta.mean, "std": meta.std}
    if model not in BUILT_IN:
        source = source_of(import_network(model, Path.cwd()))
        return Architecture(model=model, hidden=(), args=dict(args or {}), source=source, **data)
    return Architecture(
        model=model,
        hidden=hidden if model in ("mlp", "cnn") else (),
        channels=channels if model == "cnn" else None,
        **data,
    )


def build_model(architecture: Architecture) -> nn.Module:
    """The network `architecture` describes, with fresh weights from torch's global generator; a network of
    the user's is built, wrapped in Normalised and tried on a batch (stages.core.user_networks)."""
    if architecture.model == "cnn":
        cnn = CNN(architecture.channels, architecture.hidden, architecture.num_classes, architecture.image_shape)
        return Normalised(cnn, architecture)
    if architecture.built_in:
        return Normalised(MLP(layer_widths(architecture)), architecture)
    spec, shape, classes = architecture.model, architecture.image_shape, architecture.num_classes
    factory = import_network(spec, Path.cwd())
    network = build_network(spec, factory, data_arguments(factory, classes, shape) | (architecture.args or {}))
    model = Normalised(network, architecture)
    check_outputs(spec, model, shape, classes)
    return model


def init_model(architecture: Architecture, seed: int, device: torch.device) -> nn.Module:
    """A new model with seeded initial weights, drawn on the CPU so that they are the same on every device."""
    torch.manual_seed(seed)
    return build_model(architecture).to(device)


def save_model(folder: Path, model: nn.Module, card: Card) -> None:
    """Write the weights (from CPU tensors, so a GPU-trained model loads anywhere) and the card."""
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    write_tensors(folder / WEIGHTS, weights)
    write_card(folder, card)


def load_model(folder: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Card]:
    """Rebuild a saved model from its card and weights; safetensors runs no pickled code (a network of the
    user's runs its own file, refused when it changed since training).

    Both files are checked against what `save_model` writes (the card's keys and types, one class name
    per output, every weight's name, dtype and shape), so a damaged or mismatched model is a FileProblem
    naming the file, never a model that evaluates "successfully".
    """
    card = read_card(folder)
    if card.architecture.source is not None:
        check_source(card.architecture.source, Path.cwd(), folder / CARD)
    model = build_model(card.architecture)
    weights = read_tensors(folder / WEIGHTS, "weights")
    check_weights(
        folder / WEIGHTS,
        folder,
        expected={name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in model.state_dict().items()},
        found={name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in weights.items()},
    )
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
