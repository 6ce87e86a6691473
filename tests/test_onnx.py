"""The network as ONNX (stages/core/export.py): ONNX Runtime computes the network's logits from the same uint8
images at any batch size, the file's bytes depend on the weights alone, and a network ONNX cannot express is
one line naming the operator, with nothing written.

The oracle is the torch network itself: a plain `torch.nn` one as a user writes it, normalisation inside.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from helpers import PROJECT, synthetic_split
from safetensors.torch import save_file
from torch import nn

from stages.core.contract import Architecture, Card, OnnxRecord, read_card
from stages.core.export import OPSET, ExportError, export_onnx, save_with_onnx

IMAGE_SHAPE = (28, 28)


class Normalised(nn.Module):
    """uint8 (B, H, W) -> normalised float (B, 1, H, W) -> `net`: what every saved model takes."""

    def __init__(self, net: nn.Module, mean: float = 0.29, std: float = 0.35) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("scale", torch.tensor(1 / (255 * std)))
        self.register_buffer("shift", torch.tensor(-mean / std))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.unsqueeze(1).float() * self.scale + self.shift)


class Net(nn.Module):
    """Convolutions, batch norm straight after one (which the exporter folds), pooling, dropout, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 5, stride=2, padding=2, groups=2)
        self.norm2 = nn.BatchNorm2d(16)
        self.dropout = nn.Dropout(0.25)
        self.head = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.norm1(self.conv1(x))), 2)  # (B, 8, 14, 14)
        x = F.relu(self.norm2(self.conv2(x)))  # (B, 16, 7, 7)
        return self.head(self.dropout(x.flatten(1)))


def trained_like(seed: int = 0) -> Normalised:
    """A Net with seeded weights and batch-norm statistics that are not the initial ones, as after training."""
    torch.manual_seed(seed)
    model = Normalised(Net())
    images, _ = synthetic_split(64, seed=seed)
    with torch.no_grad():
        model.train()(images)  # running means and variances move off 0 and 1
    return model.eval()


def logits(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(images).numpy()


def test_onnx_runtime_computes_the_networks_logits_at_any_batch_size(tmp_path: Path) -> None:
    model = trained_like()
    record = export_onnx(model, IMAGE_SHAPE, tmp_path / "model.onnx")
    assert (record.file, record.opset, record.input, record.output) == ("model.onnx", OPSET, "images", "logits")
    session = onnxruntime.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    (given,), (returned,) = session.get_inputs(), session.get_outputs()
    assert (given.name, given.type, given.shape[1:]) == ("images", "tensor(uint8)", [28, 28])
    assert (returned.name, returned.type, returned.shape[1:]) == ("logits", "tensor(float)", [10])
    images, _ = synthetic_split(300, seed=1)
    for batch in (images[:1], images[:7], images):
        (got,) = session.run(["logits"], {"images": batch.numpy()})
        np.testing.assert_allclose(got, logits(model, batch), rtol=0, atol=1e-4)
    assert model.training is False and next(model.parameters()).requires_grad  # the model given is left alone


def test_the_network_on_a_gpu_or_in_training_mode_is_exported_as_evaluated(tmp_path: Path) -> None:
    """Dropout off and batch norm's running statistics: the network as evaluate runs it, whatever its mode."""
    model = trained_like()
    export_onnx(model.train(), IMAGE_SHAPE, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    images, _ = synthetic_split(20, seed=2)
    (got,) = session.run(["logits"], {"images": images.numpy()})
    np.testing.assert_allclose(got, logits(model.eval(), images), rtol=0, atol=1e-4)


EXPORT = f"""
import hashlib, sys
sys.path[:0] = [{str(PROJECT)!r}, {str(PROJECT / "tests")!r}]
import stages  # the numerics pin, as in a stage
import torch
from pathlib import Path
from safetensors.torch import load_file
from test_onnx import IMAGE_SHAPE, Net, Normalised
from stages.core.export import export_onnx
torch.set_num_threads(int(sys.argv[1]))
model = Normalised(Net())
model.load_state_dict(load_file(sys.argv[2]))
export_onnx(model, IMAGE_SHAPE, Path(sys.argv[3]))
print(hashlib.sha256(Path(sys.argv[3]).read_bytes()).hexdigest())
"""


def exported_elsewhere(weights: Path, threads: int, variant: dict[str, str], out: Path) -> str:
    """The sha256 of the file exported from `weights` in a fresh process pinned as a stage is, with `variant`."""
    env = {key: value for key, value in os.environ.items() if key not in variant} | variant
    result = subprocess.run(
        [sys.executable, "-c", EXPORT, str(threads), str(weights), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize(
    ("threads", "variant"),
    [
        (3, {}),
        (8, {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}),
    ],
)
def test_the_same_weights_give_the_same_bytes(threads: int, variant: dict[str, str], tmp_path: Path) -> None:
    """In a fresh process, at another thread count, under another CPU's kernel choices: the same file.

    Both exports run pinned as a stage does (`import stages` first, stages/numerics.py): folding batch norm
    into a convolution takes square roots, which torch computes with MKL's vector math, on the branch MKL
    picks for the CPU unless MKL_CBWR pins it (without it, MKL_ENABLE_INSTRUCTIONS=SSE4_2 gives another file).
    """
    weights = tmp_path / "weights.safetensors"
    save_file(trained_like().state_dict(), weights)
    reference = exported_elsewhere(weights, 1, {}, tmp_path / "here.onnx")
    assert exported_elsewhere(weights, threads, variant, tmp_path / "there.onnx") == reference


class Cumulative(nn.Module):
    """A running maximum over the features: aten::cummax, which ONNX has no operator for."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(784, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cummax(self.head(images.flatten(1).float()), dim=1).values


class BatchInPython(nn.Module):
    """A network that takes the batch size as a Python int, len(images): tracing records it as a constant 2."""

    def __init__(self, offset: bool) -> None:
        super().__init__()
        self.head = nn.Linear(784, 10)
        self.offset = offset

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.offset:  # right shapes, wrong logits
            return self.head(images.flatten(1).float()) + len(images)
        return self.head(images.float().reshape(len(images), -1))  # the file fails on other sizes


@pytest.mark.parametrize(
    ("network", "message"),
    [
        (Cumulative(), f"ONNX opset {OPSET} cannot express the operator aten::cummax"),
        (BatchInPython(offset=False), "the file fails on a batch of 1 images: "),
        (BatchInPython(offset=True), "the file's logits for a batch of 1 images are not the network's: "),
    ],
)
def test_a_network_onnx_cannot_express_is_one_line_and_nothing_is_written(
    network: nn.Module, message: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ExportError) as raised:
        export_onnx(network, IMAGE_SHAPE, tmp_path / "model.onnx")
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []
    printed = capfd.readouterr()
    assert (printed.out, printed.err) == ("", "")  # the exporter's C++ graph dump and warnings: not the stage's output


def test_a_model_folder_without_onnx_still_gets_its_weights_and_card(tmp_path: Path) -> None:
    """What train writes for a network ONNX cannot express: the weights and a card without `onnx`, and why."""
    architecture = Architecture(model="logreg", hidden=(), image_shape=IMAGE_SHAPE, num_classes=10, mean=0.3, std=0.3)
    card = Card(architecture=architecture, classes=tuple("abcdefghij"), dataset="x")
    failed = save_with_onnx(tmp_path, Cumulative(), card)
    assert str(failed) == f"ONNX opset {OPSET} cannot express the operator aten::cummax"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    assert read_card(tmp_path) == card and read_card(tmp_path).onnx is None
    assert save_with_onnx(tmp_path, trained_like(), card) is None
    assert read_card(tmp_path).onnx == OnnxRecord(file="model.onnx", opset=OPSET, input="images", output="logits")
