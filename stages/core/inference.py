"""The saved model run with numpy: what `stages.commands.predict` computes with, so that it starts without torch.

`import torch` is most of a fresh process's start-up here (about 3 s of CPU on the 2-core machine these
numbers come from, against 0.2 s for numpy, PIL and safetensors), and a model of linear layers needs none
of it to predict. The arithmetic is `Classifier.forward`'s, from the same two files; a test holds the
logits equal to the Classifier's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime

from stages.core import products
from stages.core.artifacts import read_tensors
from stages.core.contract import Card, check_images, check_weights, expected_weights, read_card
from stages.core.files import WEIGHTS

QUIET = 4  # ONNX Runtime logs only what is fatal: its errors come back as exceptions, which name the file


class NumpyClassifier:
    """`Classifier` for inference: the same checks, the same logits (float32), numpy arrays in and out."""

    def __init__(self, card: Card, weights: dict[str, np.ndarray]) -> None:
        architecture = card.architecture
        self.image_shape = architecture.image_shape
        # nn.Sequential's names: layers.0 (Linear), layers.1 (ReLU), layers.2 (Linear), ...
        count = len(expected_weights(architecture)) // 2
        self.layers = [(weights[f"layers.{2 * i}.weight"], weights[f"layers.{2 * i}.bias"]) for i in range(count)]
        self.scale = np.float32(1 / (255 * architecture.std))
        self.shift = np.float32(-architecture.mean / architecture.std)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W) -> float32 logits (B, classes)."""
        check_images(images, self.image_shape)
        pixels = images.reshape(len(images), -1).astype(np.float32)  # (B, H*W) in 0..255
        # Normalisation folded into the first layer, exactly as Classifier.forward does it.
        (weight, bias), *rest = self.layers
        hidden = products.matmul(pixels, weight.T) * self.scale + (bias + self.shift * weight.sum(1))
        for weight, bias in rest:
            hidden = products.matmul(np.maximum(hidden, 0), weight.T) + bias
        return hidden


class TorchClassifier:
    """A cnn or a network of the user's, run by torch behind NumpyClassifier's interface: convolutions are
    not worth a numpy copy here, so only their predictions pay `import torch` (about 3 s of a cold start on
    the 2-core machine)."""

    def __init__(self, folder: Path) -> None:
        from stages.core.model import load_model

        self.model, _ = load_model(folder)
        self.image_shape = self.model.image_shape

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W) -> float32 logits (B, classes), as NumpyClassifier; pinned as evaluate computes them."""
        import torch

        from stages.core.pinning import pinned_cpu

        check_images(images, self.image_shape)
        with torch.no_grad(), pinned_cpu():
            return self.model(torch.from_numpy(np.ascontiguousarray(images))).numpy()


def load_classifier(folder: Path) -> tuple[NumpyClassifier | TorchClassifier, Card]:
    """The model in `folder`, its card and weights checked as `stages.core.model.load_model` checks them."""
    card = read_card(folder)
    if card.architecture.model not in ("logreg", "mlp"):
        return TorchClassifier(folder), card
    path = folder / WEIGHTS
    weights = read_tensors(path, "weights", numpy=True)
    check_weights(
        path,
        folder,
        expected={name: ("float32", shape) for name, shape in expected_weights(card.architecture).items()},
        found={name: (str(array.dtype), array.shape) for name, array in weights.items()},
    )
    return NumpyClassifier(card, weights), card


def session_for(data: bytes) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session of the file's bytes, on the CPU, that logs nothing: its errors are exceptions."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = QUIET
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def runtime_error(error: Exception) -> str:
    """ONNX Runtime's message in one line, without its codes: `[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Failed
    to load model because protobuf parsing failed.` -> `Failed to load model because protobuf parsing failed`."""
    return str(error).split(" : ", 3)[-1].splitlines()[0].strip().rstrip(".")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
