"""The saved model run with numpy: what `stages.predict` computes with, so that it starts without torch.

`import torch` is most of a fresh process's start-up here (about 3 s of CPU on the 2-core machine these
numbers come from, against 0.2 s for numpy, PIL and safetensors), and a model of linear layers needs none
of it to predict. The arithmetic is `Classifier.forward`'s, from the same two files; a test holds the
logits equal to the Classifier's.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from stages.cli import StageError
from stages.contract import CARD, REBUILD, WEIGHTS, check_images, load_card


class NumpyClassifier:
    """`Classifier` for inference: the same checks, the same logits (float32), numpy arrays in and out."""

    def __init__(self, card: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
        architecture = card["architecture"]
        self.image_shape = tuple(architecture["image_shape"])
        # nn.Sequential's names: layers.0 (Linear), layers.1 (ReLU), layers.2 (Linear), ...
        count = len(architecture["hidden"]) + 1
        self.layers = [(weights[f"layers.{2 * i}.weight"], weights[f"layers.{2 * i}.bias"]) for i in range(count)]
        mean, std = architecture["mean"], architecture["std"]
        self.scale = np.float32(1 / (255 * std))
        self.shift = np.float32(-mean / std)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W) -> float32 logits (B, classes)."""
        check_images(images, self.image_shape)
        pixels = images.reshape(len(images), -1).astype(np.float32)  # (B, H*W) in 0..255
        # Normalisation folded into the first layer, exactly as Classifier.forward does it.
        (weight, bias), *rest = self.layers
        hidden = (pixels @ weight.T) * self.scale + (bias + self.shift * weight.sum(1))
        for weight, bias in rest:
            hidden = np.maximum(hidden, 0) @ weight.T + bias
        return hidden


class TorchClassifier:
    """A cnn, run by torch behind the same numpy interface: convolutions are not worth a numpy copy here,
    so only a cnn's predictions pay `import torch` (about 3 s of a cold start on the 2-core machine)."""

    def __init__(self, folder: Path) -> None:
        from stages.model import load_model

        self.model, _ = load_model(folder)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W) -> float32 logits (B, classes), as NumpyClassifier."""
        import torch

        check_images(images, self.model.image_shape)
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(images))).numpy()


def load_classifier(folder: Path) -> tuple[NumpyClassifier | TorchClassifier, dict[str, Any]]:
    """The model in `folder`, its card and weights checked as `stages.model.load_model` checks them."""
    card = load_card(folder / CARD).model_dump(mode="json", exclude_defaults=True)
    if card["architecture"]["model"] == "cnn":
        return TorchClassifier(folder), card
    path = folder / WEIGHTS
    try:
        weights = load_file(str(path))
    except FileNotFoundError:
        raise StageError(f"{path}: missing; {REBUILD}") from None
    except (SafetensorError, OSError) as error:
        raise StageError(f"{path}: not a safetensors file ({error}); {REBUILD}") from None
    architecture = card["architecture"]
    widths = [int(np.prod(architecture["image_shape"])), *architecture["hidden"], architecture["num_classes"]]
    expected = {}
    for index, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
        expected[f"layers.{2 * index}.weight"] = ("float32", (width_out, width_in))
        expected[f"layers.{2 * index}.bias"] = ("float32", (width_out,))
    found = {name: (str(array.dtype), array.shape) for name, array in weights.items()}
    if found != expected:
        wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        raise StageError(
            f"{path}: does not match {folder / CARD} ({wrong[0]}: expected {expected.get(wrong[0])}, "
            f"found {found.get(wrong[0])}); {REBUILD}"
        )
    return NumpyClassifier(card, weights), card


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
