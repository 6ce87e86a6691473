"""Files into the images a model was trained on: reading inputs, and fitting pictures into the dataset's frame.

Pure functions of paths, bytes and a `Frame` (the registry, `stages/datasets.yaml`, says how each dataset
made its images); no argparse, no DVC, no torch. Pictures are decoded with PIL, chosen by start-up time:
in a process that has imported torch, `from PIL import Image` adds at most 0.2 s and `import torchvision.io`
1.9-5 s (benchmarks/predict_speed.py, 2 shared cores), for the same PNG and JPEG decoders.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from stages.core.datasets import Frame
from stages.core.errors import FileProblem
from stages.core.idx import read_idx_array
from stages.core.products import one_blas_thread

# How a file announces what it is; content decides, not the extension. The pictures are the formats of
# torchvision's IMG_EXTENSIONS that PIL decodes (PGM is PIL's PPM format; WebP is checked apart: its
# signature has the file's size in the middle).
SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpeg",
    b"BM": "bmp",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
    **{f"P{kind}".encode(): "ppm" for kind in "123456"},  # netpbm: bitmap, grey, colour; ASCII or binary
    b"\x93NUMPY": "npy",
    b"\x00\x00\x08": "idx",  # unsigned-byte IDX, the only element type of MNIST-family files
    b"\x1f\x8b": "gzip",
}
PICTURES = ("png", "jpeg", "bmp", "tiff", "ppm", "webp")
READABLE = "PNG, JPEG, BMP, TIFF, PPM/PGM, WebP, .npy (uint8, HxW or NxHxW) or IDX"
LIGHT = 128  # a corner luma at least this is a light background: the picture is inverted
# An enlarged image is given back by enlarging its own reduction to within this RMS (grey levels): the
# rounding of an 8-bit enlargement is at most 0.5, and a photograph's detail and noise at the scale of
# single pixels is far above it.
ENLARGED_RMS = 1.5
EXACT_RMS = 0.05  # given back exactly: no other filter can do better
REFINEMENTS = 8  # at most, of a reduction corrected for 8-bit clipping (_refined); 3-5 suffice
# The filters an enlargement is tried against: PIL's, which are also OpenCV's and torchvision's kernels
# with the same pixel-centre convention (nearest, bilinear, bicubic) and the anti-aliasing ones.
ENLARGEMENTS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "hamming": Image.Resampling.HAMMING,
}
OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")  # `<_io.BytesIO object at 0x7f...>`: no help to a user


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
            files = files_under(path)
            if not files:
                yield path, "empty folder: no files to predict"
            for file in files:
                yield Path(file), None
        elif path.is_file():
            yield path, None
        else:
            yield path, "no such file or folder"


def files_under(folder: Path) -> list[str]:
    """Every file below `folder`, hidden files and folders skipped, sorted.

    os.walk and strings: rglob and sorting Paths cost about 0.1 ms a file, as much as decoding a 28x28 PNG.
    """
    found = []
    for root, subfolders, names in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [os.path.join(root, name) for name in names if not name.startswith(".")]
    return sorted(found)


def read_input(path: Path, frame: Frame | None, image_shape: tuple[int, int]) -> Converted:
    """Read one file: pictures are fitted into `frame`, arrays (.npy, IDX) are taken as they are."""
    data, kind = read_file(path)
    if kind in ("npy", "idx"):
        images = read_npy(data) if kind == "npy" else read_idx_images(path, data[3] if len(data) > 3 else 3)
        if images.ndim > 0 and len(images) == 0:
            raise UnreadableInput(f"holds no images (an array of shape {images.shape})")
        return Converted(images, False, "array as is" if kind == "npy" else "IDX images as is", array=True)
    if kind == "gzip":
        raise UnreadableInput(f"gzip-compressed; gunzip it first (predict reads {READABLE} files)")
    if kind is None:
        raise UnreadableInput(f"not a {READABLE} file")
    picture = decode_picture(data, kind)
    pixels, inverted, conversion = fit_picture(picture, frame, image_shape)
    return Converted(pixels[None], inverted, conversion)


def read_file(path: Path) -> tuple[bytes, str | None]:
    """The bytes of `path`, and what they are by their signature (None: none of SIGNATURES)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UnreadableInput(f"cannot read: {error.strerror}") from None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return data, "webp"
    return data, next((kind for magic, kind in SIGNATURES.items() if data.startswith(magic)), None)


def read_npy(data: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as error:
        raise UnreadableInput(f"damaged .npy file ({plain(error)})") from None
    return array[None] if array.ndim == 2 else array  # a single H x W image is a batch of one


def read_idx_images(path: Path, dimensions: int) -> np.ndarray:
    """An IDX file of N x H x W (or one H x W) images, read by the pipeline's own checked reader."""
    try:
        images = read_idx_array(path, 2 if dimensions == 2 else 3)
    except FileProblem as error:
        raise UnreadableInput(error.problem) from None  # the problem alone: the path is the user's
    return images[None] if images.ndim == 2 else images


def decode_picture(data: bytes, kind: str) -> Image.Image:
    """The picture as PIL decodes it, or UnreadableInput naming the format (a damaged or truncated file)."""
    try:
        picture = Image.open(io.BytesIO(data), formats=(kind.upper(),))
        picture.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableInput(f"damaged {kind.upper()} file ({plain(error)})") from None
    return picture


def plain(error: Exception) -> str:
    """A library's message without the Python object reprs it may carry (PIL names the BytesIO it read)."""
    text = OBJECT_REPR.sub("", str(error)).strip()
    return text or type(error).__name__


def fit_picture(
    picture: Image.Image, frame: Frame | None, image_shape: tuple[int, int]
) -> tuple[np.ndarray, bool, str]:
    """Grayscale uint8 (H, W) as the dataset made its images, whether it was inverted, and what was done.

    A picture already of the model's size is taken as framed (only grayscale and polarity change); any
    other is trimmed, resized with its aspect kept, sharpened where the dataset was, and centred, in the
    dataset's order (`Frame`). The dataset draws a light object on black: a picture whose corners are light
    (a product shot on white, ink on paper) is negated.
    """
    image = _flatten(picture)  # "L" or "RGB"
    width, height = image.size
    pixels = np.frombuffer(image.tobytes(), np.uint8).reshape(height, width, -1)  # (H, W, 1 or 3)
    # The corner colour: the median of the four corners per channel, so that one odd corner does not decide.
    corners = pixels[[0, 0, -1, -1], [0, -1, 0, -1]].tolist()  # 4 x channels; plain Python is faster here
    corner = [sum(sorted(values)[1:3]) / 2 for values in zip(*corners, strict=True)]
    luma = corner[0] if len(corner) == 1 else 0.299 * corner[0] + 0.587 * corner[1] + 0.114 * corner[2]  # PIL's
    inverted = luma >= LIGHT
    size = f"{width}x{height}"
    if (height, width) == tuple(image_shape):
        gray = pixels[..., 0] if image.mode == "L" else np.asarray(image.convert("L"))
        return (255 - gray if inverted else gray.copy()), inverted, f"{size} as is" + (", inverted" if inverted else "")
    enlarged = reduce_enlargement(image, image_shape)
    if enlarged is not None:
        gray, factor, name = enlarged
        conversion = f"{size} = {factor}x {name} enlargement, reduced" + (", inverted" if inverted else "")
        return (255 - gray if inverted else gray), inverted, conversion
    if frame is None or tuple(image_shape) != (frame.size, frame.size):
        wanted = "x".join(map(str, image_shape))
        raise UnreadableInput(
            f"{size} picture; the model's dataset does not document how it framed its images: give {wanted} pictures"
        )
    framed, conversion = frame_photo(image, pixels, corner, inverted, frame)
    return framed, inverted, conversion


def frame_photo(
    image: Image.Image, pixels: np.ndarray, corner: list[float], inverted: bool, frame: Frame
) -> tuple[np.ndarray, str]:
    """A photo (`image`, its `pixels` (H, W, channels) and `corner` colour) framed as the dataset framed its
    images (`frame`): trimmed, fitted, sharpened, negated when `inverted`, placed; and what was done."""
    size = f"{image.width}x{image.height}"
    # Trim: keep the rows and columns holding a pixel farther than the tolerance from the corner colour
    # (RMS over R, G, B, like ImageMagick's -fuzz).
    distance = np.sqrt(((pixels.astype(np.float32) - np.array(corner, np.float32)) ** 2).mean(axis=2))  # (H, W)
    keep = distance > frame.trim_tolerance * 255
    if not keep.any():
        raise UnreadableInput(f"{size} picture of one colour: nothing to predict")
    rows, columns = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
    image = image.crop((columns[0], rows[0], columns[-1] + 1, rows[-1] + 1))
    trimmed = f"{image.width}x{image.height}"

    longest = max(image.size)
    fitted = (max(1, round(image.width * frame.box / longest)), max(1, round(image.height * frame.box / longest)))
    # nearest: "subsampling, some rows and columns skipped over"; antialias: LANCZOS, PIL's former ANTIALIAS.
    resample = Image.Resampling.NEAREST if frame.resample == "nearest" else Image.Resampling.LANCZOS
    image = image.resize(fitted, resample)
    steps = [frame.resample]
    if frame.sharpen_sigma:
        image = image.filter(ImageFilter.UnsharpMask(radius=frame.sharpen_sigma, percent=100, threshold=0))
        steps.append(f"sharpened sigma {frame.sharpen_sigma:g}")
    gray = _negated(image.convert("L"), inverted)

    canvas = Image.new("L", (frame.size, frame.size), color=0)
    canvas.paste(gray, _placement(gray, frame))
    if frame.centre == "mass":
        steps.append("centre of mass")
    conversion = (
        "inverted, " if inverted else ""
    ) + f"{size} trimmed to {trimmed}, fitted {fitted[0]}x{fitted[1]} ({', '.join(steps)}) in {frame.size}x{frame.size}"
    return np.array(canvas), conversion


def _placement(gray: Image.Image, frame: Frame) -> tuple[int, int]:
    """Where `gray` goes in the frame (left, top): centred by its box, or by its centre of mass."""
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
    return left, top


def reduce_enlargement(image: Image.Image, image_shape: tuple[int, int]) -> tuple[np.ndarray, int, str] | None:
    """The uint8 (H, W) image that `image` is an integer enlargement of, with the factor and the filter; None
    for anything else (a photograph, a drawing, a picture of another size).

    An enlargement is linear and separable, picture = R @ image @ C.T, up to 8-bit clipping: per filter the
    least-squares reduction is enlarged again, as PIL enlarges 8-bit pictures, and the filter that gives the
    picture back best is refined (`_refined`) and taken when it gives it back within ENLARGED_RMS (two
    filters may both be close: bilinear and bicubic differ by less than their 8-bit rounding on a smooth image).
    """
    height, width = image_shape
    factor = image.height // height
    if factor < 2 or image.size != (width * factor, height * factor):
        return None
    one_blas_thread()  # products this small gain nothing from BLAS threads, which wait for busy cores 20-30x longer
    pixels = np.asarray(image.convert("L"), dtype=np.float32)  # (kH, kW)
    best = (np.inf, "", pixels)
    for name in ENLARGEMENTS:
        (_, rows_inverse), (_, columns_inverse) = _enlarging(height, factor, name), _enlarging(width, factor, name)
        reduced = rows_inverse @ (pixels @ columns_inverse.T)  # (H, W)
        error = _enlargement_error(reduced, pixels, name)
        if error < best[0]:
            best = (error, name, reduced)
        if error < EXACT_RMS:
            break  # the blocks of a nearest enlargement: no other filter fits better
    error, name, reduced = best
    error, reduced = _refined(reduced, pixels, name, error)
    if error > ENLARGED_RMS:
        return None
    return _as_image(reduced), factor, name


def _refined(reduced: np.ndarray, pixels: np.ndarray, name: str, error: float) -> tuple[float, np.ndarray]:
    """The reduction of `pixels` by `name` corrected for the clipping of 8-bit enlargements, and its error.

    PIL enlarges an 8-bit picture in two passes, each rounded and clipped to 0..255: where bicubic's and
    lanczos's overshoot is clipped (at a light background, or a dark one), the plain least-squares
    reduction is off by up to 20 grey levels. Each step enlarges the reduction as PIL does and reduces what
    is still missing (iterative back-projection); a true enlargement is given back exactly within a few steps.
    """
    height, width = reduced.shape
    factor = pixels.shape[0] // height
    (_, rows_inverse), (_, columns_inverse) = _enlarging(height, factor, name), _enlarging(width, factor, name)
    for _ in range(REFINEMENTS):
        if error < EXACT_RMS:
            break
        residual = pixels - _enlarged(reduced, pixels.shape, name)
        corrected = reduced + rows_inverse @ (residual @ columns_inverse.T)
        corrected_error = _enlargement_error(corrected, pixels, name)
        if corrected_error >= error:
            break
        reduced, error = corrected, corrected_error
    return error, reduced


def _enlargement_error(reduced: np.ndarray, pixels: np.ndarray, name: str) -> float:
    """The RMS difference (grey levels) between `pixels` and `reduced` enlarged by `name` as PIL does."""
    return float(np.sqrt(np.mean((_enlarged(reduced, pixels.shape, name) - pixels) ** 2)))


def _enlarged(reduced: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    picture = Image.fromarray(_as_image(reduced)).resize((shape[1], shape[0]), ENLARGEMENTS[name])
    return np.asarray(picture, dtype=np.float32)


def _as_image(reduced: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(reduced), 0, 255).astype(np.uint8)


@functools.cache
def _enlarging(size: int, factor: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """PIL's `name` enlargement of `size` pixels to `factor * size` as a matrix (factor * size, size), and its
    pseudo-inverse (size, factor * size): column i of the matrix is what PIL makes of a single bright pixel i."""
    identity = Image.fromarray(np.eye(size, dtype=np.float32), mode="F")
    matrix = np.asarray(identity.resize((factor * size, size), ENLARGEMENTS[name]), dtype=np.float64).T
    return matrix.astype(np.float32), np.ascontiguousarray(np.linalg.pinv(matrix), dtype=np.float32)


def _flatten(picture: Image.Image) -> Image.Image:
    """Grayscale ("L") or "RGB"; transparency composited onto white, as product pictures are shot."""
    if picture.mode == "L":
        return picture
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        rgba = picture.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if picture.mode in ("I;16", "I;16B", "I;16L", "I"):
        return picture.point(lambda value: value / 256).convert("L")  # 16-bit grey to 8 bits
    return picture.convert("RGB")


def _negated(gray: Image.Image, inverted: bool) -> Image.Image:
    return ImageOps.invert(gray) if inverted else gray
