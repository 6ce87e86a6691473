"""A saved model's contract: its two files, its checked card, and what it accepts (uint8 0-255, a batch).

Without torch, so that `stages.predict` can load and check without importing it; stages/model.py (the
torch model) and stages/inference.py (the same model in numpy) both take their names and checks from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from stages.cli import StageError

WEIGHTS = "model.safetensors"
CARD = "model.json"
REBUILD = "rerun the train stage: dvc repro --force train"


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
            "the dataset's frame first (python -m stages.predict does it for PNG and JPEG files)"
        )


class Architecture(BaseModel):
    """What `architecture_for` writes into the card: enough to rebuild the network."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: Literal["logreg", "mlp", "cnn"]
    hidden: tuple[PositiveInt, ...]
    channels: tuple[PositiveInt, ...] = ()  # the cnn's convolution widths; absent from other models' cards
    image_shape: tuple[PositiveInt, PositiveInt]
    num_classes: int = Field(ge=2)
    mean: float
    std: float = Field(gt=0)

    @model_validator(mode="after")
    def _channels_for_the_cnn_only(self) -> Architecture:
        if (self.model == "cnn") != bool(self.channels):
            raise ValueError("channels: the cnn needs at least one width, and only the cnn has them")
        return self


class Card(BaseModel):
    """The model card as a reader needs it; other keys (recipe, device, ...) are the writer's business."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    architecture: Architecture
    classes: tuple[str, ...]

    @model_validator(mode="after")
    def _one_name_per_output(self) -> Card:
        if len(self.classes) != self.architecture.num_classes:
            raise ValueError(
                f"{len(self.classes)} class names for {self.architecture.num_classes} outputs (num_classes)"
            )
        return self


def load_card(path: Path) -> Card:
    """The model card, checked: a StageError naming the file and the first bad key otherwise."""
    try:
        return Card.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise StageError(f"{path}: missing; run the train stage first (dvc repro train)") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(map(str, first["loc"])) or "the file"
        raise StageError(f"{path}: damaged ({where}: {first['msg']}); {REBUILD}") from None
