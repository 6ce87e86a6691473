"""The saved model run with numpy: what `stages.predict` computes with, so that it starts without torch.

`import torch` is most of a fresh process's start-up here (about 3 s of CPU on the 2-core machine these
numbers come from, against 0.2 s for numpy, PIL and safetensors), and a model of linear layers needs none
of it to predict. The arithmetic is `Classifier.forward`'s, from the same two files; a test holds the
logits equal to the Classifier's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from stages.artifacts import read_json
from stages.contract import CARD, WEIGHTS, check_images


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


def load_classifier(folder: Path) -> tuple[NumpyClassifier, dict[str, Any]]:
    card = read_json(folder / CARD)
    return NumpyClassifier(card, load_file(str(folder / WEIGHTS))), card


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
