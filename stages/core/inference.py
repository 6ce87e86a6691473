"""The saved model run by ONNX Runtime: what `stages.commands.predict` computes with, for every model.

The train stage writes the network with its normalisation as model.onnx (stages/core/export.py), so
predicting needs neither torch (`import torch` alone is about 3 s of a cold start on 2 cores) nor this
project's model code, nor any Python from the model's folder: a network of the user's runs as the built-in
ones do. The file is checked against the card before it runs: its opset, its input and its output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime

from stages.core.contract import Card, OnnxRecord, check_images, read_card
from stages.core.errors import FileProblem, damaged
from stages.core.files import CARD

# Images per run of the file: the logreg's runs take 470,000 images/s at 1,024 against 180,000/s at 10,000
# (2 shared cores: a batch in the caches), and a cnn's maps for 1,024 28x28 images take tens of MB, not GB.
BATCH = 1024
RUNS_EVERYWHERE = 21  # the newest opset of onnxruntime 1.18, the oldest pyproject.toml admits
QUIET = 4  # ONNX Runtime logs only what is fatal: its errors come back as exceptions, which name the file


class OnnxClassifier:
    """The model for inference: the same refusals as the torch model, float32 logits, numpy arrays in and out."""

    def __init__(self, session: onnxruntime.InferenceSession, image_shape: tuple[int, int], names: OnnxRecord) -> None:
        self.session, self.image_shape = session, image_shape
        self.input, self.output = names.input, names.output

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W) -> float32 logits (B, classes), BATCH images per run."""
        check_images(images, self.image_shape)
        images = np.ascontiguousarray(images)
        starts = range(0, max(len(images), 1), BATCH)  # an empty batch runs once, for its (0, classes) logits
        return np.concatenate([self.session.run([self.output], {self.input: images[i : i + BATCH]})[0] for i in starts])


def load_classifier(folder: Path) -> tuple[OnnxClassifier, Card]:
    """The model in `folder`: its card, and its ONNX file checked against it; a FileProblem naming the file
    otherwise."""
    card = read_card(folder)
    if card.onnx is None:
        raise FileProblem(
            folder / CARD,
            "names no ONNX file: the model was trained before the train stage wrote model.onnx, or its network "
            "has an operation ONNX cannot express (the train stage named it)",
            artifact="card",
            kind="outdated",
        )
    path = folder / card.onnx.file
    check_opset(card.onnx.opset, path)
    session = open_session(path)
    check_signature(session, card, card.onnx, path)
    return OnnxClassifier(session, card.architecture.image_shape, card.onnx), card


def runtime_opset() -> int:
    """The newest ONNX opset the installed ONNX Runtime has operators for."""
    from onnxruntime.capi import _pybind_state

    return max(schema.since_version for schema in _pybind_state.get_all_operator_schema() if schema.domain == "")


def check_opset(opset: int, path: Path) -> None:
    if opset <= RUNS_EVERYWHERE:
        return  # without reading the runtime's 900 operator schemas: a tenth of a cold start's imports
    newest = runtime_opset()
    if opset > newest:
        raise FileProblem(path, unsupported(newest, opset), artifact="onnx", kind="unsupported")


def unsupported(newest: int, opset: int | None = None) -> str:
    needs = f"ONNX opset {opset} (the card's)" if opset else "a newer ONNX opset"
    return (
        f"needs {needs}, which onnxruntime {onnxruntime.__version__} here does not have (it has up to {newest}); "
        "upgrade it: pip install --upgrade onnxruntime"
    )


def open_session(path: Path) -> onnxruntime.InferenceSession:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileProblem(path, "missing", artifact="onnx", kind="missing") from None
    try:
        return session_for(data)
    except Exception as error:  # onnxruntime's exception types are not importable by name
        detail = runtime_error(error)
        if "opset" in detail.lower():  # the file's own opset, newer than the card says
            raise FileProblem(path, unsupported(runtime_opset()), artifact="onnx", kind="unsupported") from None
        raise damaged(path, f"not an ONNX model this onnxruntime can load ({detail})", "onnx") from None


def session_for(data: bytes) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session of the file's bytes, on the CPU, that logs nothing: its errors are exceptions."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = QUIET
    # Its threads wait for the next run without spinning: spinning, they took the cores from reading and
    # framing the next pictures, and halved the logreg's throughput on 2 cores (benchmarks/predict_speed.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def runtime_error(error: Exception) -> str:
    """ONNX Runtime's message in one line, without its codes: `[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Failed
    to load model because protobuf parsing failed.` -> `Failed to load model because protobuf parsing failed`."""
    return str(error).split(" : ", 3)[-1].splitlines()[0].strip().rstrip(".")


def check_signature(session: onnxruntime.InferenceSession, card: Card, names: OnnxRecord, path: Path) -> None:
    """Refuse a file whose input or output is not what the card says: uint8 (batch, H, W) images in,
    float logits (batch, classes) out."""
    (height, width), classes = card.architecture.image_shape, card.architecture.num_classes
    expected = [
        (names.input, "tensor(uint8)", [height, width], f"uint8 (batch, {height}, {width})"),
        (names.output, "tensor(float)", [classes], f"float (batch, {classes})"),
    ]
    for role, found, (name, kind, shape, said) in zip(
        ("input", "output"), (session.get_inputs(), session.get_outputs()), expected, strict=True
    ):
        matches = len(found) == 1 and (found[0].name, found[0].type, found[0].shape[1:]) == (name, kind, shape)
        if not matches or len(found[0].shape) != len(shape) + 1 or isinstance(found[0].shape[0], int):
            got = ", ".join(f"{arg.name}: {arg.type.removeprefix('tensor(').rstrip(')')} {arg.shape}" for arg in found)
            problem = f"does not match {path.parent / CARD}: its {role} is {got or 'none'}, the card's {name}: {said}"
            raise damaged(path, problem, "onnx")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
