"""Files into the images a model was trained on: reading inputs, and fitting pictures into the dataset's frame.

Pure functions of paths, bytes and a `Frame` (the registry, `stages/datasets.yaml`, says how each dataset
made its images); no argparse, no DVC. Pictures are decoded with PIL: with torch already imported,
`from PIL import Image` adds about 0.1 s of start-up and `import torchvision.io` about 2.5 s (README,
"Use the model elsewhere"), for the same PNG and JPEG decoders.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stages.datasets import Frame

# How a file announces what it is; content decides, not the extension.
SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpeg",
    b"\x93NUMPY": "npy",
    b"\x00\x00\x08": "idx",  # unsigned-byte IDX, the only element type of MNIST-family files
    b"\x1f\x8b": "gzip",
}
READABLE = "PNG, JPEG, .npy (uint8, HxW or NxHxW) or IDX"
LIGHT = 128  # a corner luma at least this is a light background: the picture is inverted


class UnreadableInput(ValueError):
    """A file or folder that gives no image; the message is the one line the user sees after its path."""


@dataclasses.dataclass(frozen=True)
class Converted:
    pixels: np.ndarray  # (N, H, W); uint8 for pictures, whatever the file held for arrays
    inverted: bool  # a dark object on a light background, negated into the dataset's light-on-dark
    conversion: str  # what was done to it, in words, for the output
    array: bool = False  # from an array file (.npy, IDX): its images are named file[i]


def list_inputs(paths: list[Path]) -> Iterator[tuple[Path, str | None]]:
    """Each file to read, with None, or a path that gives nothing with the reason (missing, empty folder)."""
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                yield path, "empty folder: no files to predict"
            for file in files:
                yield file, None
        elif path.is_file():
            yield path, None
        else:
            yield path, "no such file or folder"


def read_input(path: Path, frame: Frame | None, image_shape: tuple[int, int]) -> Converted:
    """Read one file: pictures are fitted into `frame`, arrays (.npy, IDX) are taken as they are."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UnreadableInput(f"cannot read: {error.strerror}") from None
    kind = next((kind for magic, kind in SIGNATURES.items() if data.startswith(magic)), None)
    if kind == "npy":
        return Converted(read_npy(data), False, "array as is", array=True)
    if kind == "idx":
        return Converted(read_idx_images(path), False, "IDX images as is", array=True)
    if kind == "gzip":
        raise UnreadableInput(f"gzip-compressed; gunzip it first (predict reads {READABLE} files)")
    if kind is None:
        raise UnreadableInput(f"not a {READABLE} file")
    picture = decode_picture(data, kind)
    pixels, inverted, conversion = fit_picture(picture, frame, image_shape)
    return Converted(pixels[None], inverted, conversion)


def read_npy(data: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as error:
        raise UnreadableInput(f"damaged .npy file ({error})") from None
    return array[None] if array.ndim == 2 else array  # a single H x W image is a batch of one


def read_idx_images(path: Path) -> np.ndarray:
    from stages.cli import StageError
    from stages.idx import REFETCH, read_idx

    with open(path, "rb") as stream:
        dimensions = stream.read(4)[3]
    try:
        images = read_idx(path, 2 if dimensions == 2 else 3)
    except StageError as error:
        # read_idx's advice is for the pipeline's own files; here the path is the user's.
        raise UnreadableInput(str(error).removeprefix(f"{path}: ").removesuffix(f"; {REFETCH}")) from None
    return images.numpy()[None] if images.dim() == 2 else images.numpy()


def decode_picture(data: bytes, kind: str):
    """The picture as PIL decodes it, or UnreadableInput naming the format (a damaged or truncated file)."""
    from PIL import Image

    try:
        picture = Image.open(io.BytesIO(data))
        picture.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableInput(f"damaged {kind.upper()} file ({error})") from None
    return picture


def fit_picture(picture, frame: Frame | None, image_shape: tuple[int, int]) -> tuple[np.ndarray, bool, str]:
    """Grayscale uint8 (H, W) as the dataset made its images, whether it was inverted, and what was done.

    A picture already of the model's size is taken as framed (only grayscale and polarity change); any
    other is trimmed, resized with its aspect kept, sharpened where the dataset was, and centred, in the
    dataset's order (`Frame`). The dataset draws a light object on black: a picture whose corners are light
    (a product shot on white, ink on paper) is negated.
    """
    from PIL import Image, ImageFilter

    rgb = _flatten(picture)
    width, height = rgb.size
    corner = np.median(np.asarray(rgb)[[0, 0, -1, -1], [0, -1, 0, -1]].astype(np.float32), axis=0)  # (3,)
    inverted = bool(corner @ np.array([0.299, 0.587, 0.114]) >= LIGHT)  # PIL's luma weights
    size = f"{width}x{height}"
    if (height, width) == tuple(image_shape):
        gray = rgb.convert("L")
        return np.array(_negated(gray, inverted)), inverted, f"{size} as is" + (", inverted" if inverted else "")
    if frame is None or tuple(image_shape) != (frame.size, frame.size):
        wanted = "x".join(map(str, image_shape))
        raise UnreadableInput(
            f"{size} picture; the model's dataset does not document how it framed its images: give {wanted} pictures"
        )

    # Trim: keep the rows and columns holding a pixel farther than the tolerance from the corner colour
    # (RMS over R, G, B, like ImageMagick's -fuzz).
    pixels = np.asarray(rgb).astype(np.float32)  # (H, W, 3)
    distance = np.sqrt(((pixels - corner) ** 2).mean(axis=2))  # (H, W)
    keep = distance > frame.trim_tolerance * 255
    if not keep.any():
        raise UnreadableInput(f"{size} picture of one colour: nothing to predict")
    rows, columns = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
    rgb = rgb.crop((columns[0], rows[0], columns[-1] + 1, rows[-1] + 1))
    trimmed = f"{rgb.width}x{rgb.height}"

    longest = max(rgb.size)
    fitted = (max(1, round(rgb.width * frame.box / longest)), max(1, round(rgb.height * frame.box / longest)))
    # nearest: "subsampling, some rows and columns skipped over"; antialias: LANCZOS, PIL's former ANTIALIAS.
    resample = Image.Resampling.NEAREST if frame.resample == "nearest" else Image.Resampling.LANCZOS
    rgb = rgb.resize(fitted, resample)
    steps = [frame.resample]
    if frame.sharpen_sigma:
        rgb = rgb.filter(ImageFilter.UnsharpMask(radius=frame.sharpen_sigma, percent=100, threshold=0))
        steps.append(f"sharpened sigma {frame.sharpen_sigma:g}")
    gray = _negated(rgb.convert("L"), inverted)

    canvas = Image.new("L", (frame.size, frame.size), color=0)
    left, top = (frame.size - gray.width) // 2, (frame.size - gray.height) // 2
    if frame.centre == "mass":
        # Move the intensity-weighted centroid to the frame's centre (pixel i covers [i, i + 1)).
        weights = np.asarray(gray, dtype=np.float64)
        total = weights.sum()
        if total > 0:
            cy = (weights.sum(axis=1) @ np.arange(gray.height)) / total
            cx = (weights.sum(axis=0) @ np.arange(gray.width)) / total
            left = int(np.clip(round(frame.size / 2 - (cx + 0.5)), 0, frame.size - gray.width))
            top = int(np.clip(round(frame.size / 2 - (cy + 0.5)), 0, frame.size - gray.height))
        steps.append("centre of mass")
    canvas.paste(gray, (left, top))
    conversion = (
        "inverted, " if inverted else ""
    ) + f"{size} trimmed to {trimmed}, fitted {fitted[0]}x{fitted[1]} ({', '.join(steps)}) in {frame.size}x{frame.size}"
    return np.array(canvas), inverted, conversion


def _flatten(picture):
    """RGB; transparency composited onto white, as product pictures are shot."""
    from PIL import Image

    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        rgba = picture.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if picture.mode in ("I;16", "I;16B", "I;16L", "I"):
        picture = picture.point(lambda value: value / 256).convert("L")  # 16-bit grey to 8 bits
    return picture.convert("RGB")


def _negated(gray, inverted: bool):
    from PIL import ImageOps

    return ImageOps.invert(gray) if inverted else gray
