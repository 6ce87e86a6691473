"""A saved model's contract: its card, its weights' names and shapes, and what it accepts (uint8, a batch).

Without torch, so that `stages.commands.predict` can load and check a model without importing it;
stages/core/model.py (the torch model) and stages/core/inference.py (the same model in numpy) both take
their types and checks from here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from stages.core.artifacts import read_checked, write_json
from stages.core.errors import damaged
from stages.core.files import CARD

# Images per forward pass when only predicting with a linear model (Normalised.predict_batch in
# stages/core/model.py): memory and speed; the logits change only in their last bits (stages/core/products.py
# cuts each product into tasks by its shape).
PREDICT_BATCH = 8192


class ImageInputError(ValueError):
    """Images the model cannot score; the message says what it takes and how to convert."""


def check_images(images: Any, image_shape: list[int] | tuple[int, ...]) -> None:
    """Refuse anything but uint8 pixels 0-255 of shape (B, *image_shape): no silent 10 % accuracy.

    `images` is a torch tensor or a numpy array: only its dtype, ndim and shape are read.
    """
    frame = "x".join(map(str, image_shape))
    batch = f"(B, {', '.join(map(str, image_shape))})"
    dtype = str(images.dtype)  # torch.uint8 / uint8
    if dtype.removeprefix("torch.") != "uint8":
        # float in [0, 1] (torchvision's ToTensor) would be scored as nearly black images, without a word.
        raise ImageInputError(
            f"got {dtype} pixels; the model takes uint8 pixels 0-255: convert images in [0, 1] with "
            "(images * 255).round().to(torch.uint8) (numpy: .astype(numpy.uint8) for .to(torch.uint8))"
        )
    if list(images.shape) == list(image_shape):
        raise ImageInputError(
            f"got one image of shape {tuple(images.shape)}; the model takes a batch {batch}: "
            "a single image is a batch of one, images[None] (or images.unsqueeze(0))"
        )
    if images.ndim != len(image_shape) + 1:
        raise ImageInputError(
            f"got {images.ndim} dimensions {tuple(images.shape)}; the model takes a batch of {frame} images {batch}"
        )
    if list(images.shape[1:]) != list(image_shape):
        raise ImageInputError(
            f"got {'x'.join(map(str, images.shape[1:]))} images; the model takes {frame} images: fit them into "
            "the dataset's frame first (python -m stages.commands.predict does it for PNG and JPEG files)"
        )


# The card's JSON types: the keys and types are its writer's, the values its reader's business.
Numerics = dict[str, str | None]  # stages.numerics.settings(): what the CPU computed with
Recipe = dict[str, str | int | float | bool]  # TrainConfig.recipe(): what the weights depend on
FrameRecord = dict[str, str | int | float | None]  # stages.core.datasets.Frame's fields: how pictures were framed


# The networks this project defines; any other `model` names a network of the user's (FILE.py:NAME or MODULE:NAME).
BUILT_IN = ("logreg", "mlp", "cnn")


class Source(BaseModel):
    """The file that defined a network of the user's: its path below the folder it was imported from
    (`nets/wide.py`, `torchvision/models/resnet.py`, the same on every machine) and its sha256 then."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    file: str
    sha256: str


class Architecture(BaseModel):
    """Enough to rebuild the network, written into the card."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: str  # one of BUILT_IN, or a network of the user's: FILE.py:NAME or MODULE:NAME
    hidden: tuple[PositiveInt, ...]  # widths of the mlp's hidden layers (the cnn's after its convolutions)
    image_shape: tuple[PositiveInt, PositiveInt]
    num_classes: int = Field(ge=2)
    mean: float
    std: float = Field(gt=0)
    # The cnn's convolution widths; absent for the others, so that their cards keep their bytes.
    channels: tuple[PositiveInt, ...] | None = None
    # A network of the user's: the keyword arguments it was built with, and the file that defined it.
    args: dict[str, Any] | None = None
    source: Source | None = None

    @property
    def built_in(self) -> bool:
        return self.model in BUILT_IN

    @model_validator(mode="after")
    def _hidden_layers_fit_the_model(self) -> Architecture:
        if not self.built_in:
            if self.hidden or self.channels or self.args is None or self.source is None:
                raise ValueError(f"{self.model}: a network of the user's has args and a source, no hidden or channels")
            return self
        if self.args is not None or self.source is not None:
            raise ValueError(f"{self.model}: a built-in network has no args or source")
        if (self.model == "logreg" and self.hidden) or (self.model == "mlp" and not self.hidden):
            raise ValueError(f"{self.model} with hidden widths {list(self.hidden)}")
        if (self.model == "cnn") != bool(self.channels):
            raise ValueError(f"{self.model} with channels {self.channels}: the cnn needs them, only the cnn has them")
        return self


class Stopped(BaseModel):
    """How training ended: the epoch whose weights were kept (lowest validation loss), and why it stopped."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    epoch: int  # the last epoch trained
    best_epoch: int
    reason: str


class OnnxRecord(BaseModel):
    """The network as ONNX, beside the weights (stages/core/export.py): what ONNX Runtime runs, anywhere."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    file: str
    opset: int  # ONNX's operator set: a runtime must have it
    input: str  # its one input: uint8 images (batch, H, W), pixels 0-255, framed as the dataset's
    output: str  # its one output: float32 logits (batch, classes), in the order of the card's classes


class Card(BaseModel):
    """model.json: what the model is, what it was trained on and how."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    architecture: Architecture
    classes: tuple[str, ...]
    dataset: str
    # Recorded by the train stage; a model made elsewhere (a test, a notebook) may leave them out.
    device: str | None = None  # the device it was trained on
    numerics: Numerics | None = None
    recipe: Recipe | None = None
    stopped: Stopped | None = None
    # How the dataset's pictures were framed, when it is a folder of pictures (a registered dataset's frame is
    # in stages/datasets.yaml): predict frames a new picture the same way.
    frame: FrameRecord | None = None
    # Absent for a model trained before train exported ONNX, or one whose network ONNX cannot express.
    onnx: OnnxRecord | None = None

    @model_validator(mode="after")
    def _one_name_per_output(self) -> Card:
        if len(self.classes) != self.architecture.num_classes:
            raise ValueError(
                f"{len(self.classes)} class names for {self.architecture.num_classes} outputs (num_classes)"
            )
        return self


def read_card(folder: Path) -> Card:
    """The card of the model in `folder`, checked; a FileProblem naming it otherwise."""
    return read_checked(folder / CARD, Card, "card")


def write_card(folder: Path, card: Card) -> None:
    write_json(folder / CARD, card.model_dump(mode="json", exclude_none=True))


def layer_widths(architecture: Architecture) -> list[int]:
    """Inputs, hidden widths, outputs of a linear model (logreg, mlp): its nn.Linear layers take consecutive
    pairs (stages/core/networks.py)."""
    hidden = architecture.hidden if architecture.model == "mlp" else ()
    return [math.prod(architecture.image_shape), *hidden, architecture.num_classes]


def check_weights(path: Path, folder: Path, expected: dict[str, Any], found: dict[str, Any]) -> None:
    """Refuse weights whose names, dtypes or shapes (`found`) are not the card's (`expected`)."""
    if found == expected:
        return
    wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
    first = wrong[0]
    problem = f"does not match {folder / CARD} ({first}: expected {expected.get(first)}, found {found.get(first)})"
    raise damaged(path, problem, "weights")
