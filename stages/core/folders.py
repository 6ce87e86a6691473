"""A folder of labelled pictures (torchvision's `ImageFolder` layout) as a dataset: its classes, its pictures
framed into images, and the list of what it held.

    <root>/train/<class>/<picture>   and   <root>/test/<class>/<picture>

Class names and their order are the folder names, sorted, as torchvision's `find_classes` gives them;
pictures are the files below each class folder with one of torchvision's IMG_EXTENSIONS, sorted by path
(hidden files skipped; any other file is named in one warning and left out, as ImageFolder leaves it). Each is
framed by `stages.core.images.fit_picture`, the function predict frames a photo with, into `FOLDER_FRAME`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from stages.core.artifacts import atomic_file
from stages.core.datasets import ROLES, Frame, Manifest
from stages.core.errors import SettingError
from stages.core.images import PICTURES, UnreadableInput, decode_picture, files_under, fit_picture, read_file

log = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train", "test")
CHUNK = 2000  # pictures per task when framing on several CPUs: a pool pays off from two chunks on
# The raw files of a folder dataset: the names the registered datasets' IDX files have, by role.
RAW_NAMES = dict(
    zip(
        ROLES,
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        strict=True,
    )
)
# torchvision's IMG_EXTENSIONS, all of which PIL decodes; the file's content decides its format.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
NAMED = 5  # files named in the warning about files that are not pictures; the rest are counted
MAX_CLASSES = 256  # IDX labels are unsigned bytes
# Pictures of any size are framed as Fashion-MNIST frames a product shot (trimmed, longest edge to the
# side, centred), anti-aliased rather than subsampled: a user's photos are larger than the thumbnails
# Fashion-MNIST subsampled, and subsampling them aliases.
FOLDER_FRAME = Frame(size=28, box=28, trim_tolerance=0.05, resample="antialias", sharpen_sigma=None, centre="box")


class UnreadablePicture(SettingError):
    """A picture of the folder that gives no image: `path: why`."""


@dataclasses.dataclass(frozen=True)
class Picture:
    file: str  # relative to the dataset's root, with "/"
    label: int  # index into the classes
    size: int  # bytes
    sha256: str

    def listed(self, classes: tuple[str, ...]) -> dict[str, str | int]:
        """The manifest's entry: file, class (by name), size, sha256."""
        return {"file": self.file, "class": classes[self.label], "size": self.size, "sha256": self.sha256}


def find_classes(split: Path) -> tuple[str, ...]:
    """The class folders of `split`, sorted (torchvision's `find_classes`); SettingError for a name a card
    cannot carry, fewer than two classes, or more than MAX_CLASSES."""
    if not split.is_dir():
        raise SettingError(f"{split}: no such folder; the layout is <root>/train/<class>/<picture> (and test/ alike)")
    classes = tuple(sorted(entry.name for entry in os.scandir(split) if entry.is_dir() and entry.name[0] != "."))
    for name in classes:
        if name != name.strip() or not name.isprintable():
            raise SettingError(f"{split / name}: {name!r} is not a class name (spaces at an end, or unprintable)")
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise SettingError(f"{split}: a classifier needs two classes or more (class folders found: {found})")
    if len(classes) > MAX_CLASSES:
        raise SettingError(f"{split}: {len(classes)} class folders; at most {MAX_CLASSES} (labels are stored as bytes)")
    return classes


def list_pictures(root: Path, split: str, classes: tuple[str, ...]) -> tuple[list[tuple[str, int]], list[str]]:
    """(relative path, label) of every picture of `split`, by class then path, and the relative paths of the
    other files there (not pictures by their extension); SettingError for a class without pictures."""
    pictures, others = [], []
    for label, name in enumerate(classes):
        folder = root / split / name
        found = []
        for file in files_under(folder):
            relative = os.path.relpath(file, root).replace(os.sep, "/")
            (found if file.lower().endswith(EXTENSIONS) else others).append(relative)
        if not found:
            raise SettingError(
                f"{folder}: no pictures ({' '.join(EXTENSIONS)}) in this class folder; add some or remove it"
            )
        pictures += [(path, label) for path in found]
    return pictures, others


def warn_not_pictures(root: Path, others: list[str]) -> None:
    """One warning naming the files of the class folders that are not pictures, which are left out."""
    if not others:
        return
    named = ", ".join(others[:NAMED]) + (f" and {len(others) - NAMED} more" if len(others) > NAMED else "")
    log.warning(
        f"{root}: {len(others)} {'file is' if len(others) == 1 else 'files are'} not pictures "
        f"({' '.join(EXTENSIONS)}) and left out: {named}"
    )


def frame_pictures(
    root: Path,
    pictures: list[tuple[str, int]],
    frame: Frame,
    skip: Callable[[str, str], None] | None,
) -> tuple[np.ndarray, np.ndarray, list[Picture]]:
    """uint8 images (N, size, size), uint8 labels (N,), and what each picture was, in the order given.

    A picture that cannot be read stops with UnreadablePicture naming it, or, with `skip`, is reported to
    `skip(file, problem)` and left out. Large folders are framed on every CPU (the same result: each picture
    is framed alone, and the chunks are put back in order).
    """
    chunks = [pictures[start : start + CHUNK] for start in range(0, len(pictures), CHUNK)]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # Linux: ours
    workers = min(cpus, len(chunks))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            framed = list(pool.map(_frame_chunk, itertools.repeat(root), chunks, itertools.repeat(frame)))
    else:
        framed = [_frame_chunk(root, chunk, frame) for chunk in chunks]
    for file, problem in (problem for _, _, problems in framed for problem in problems):
        if skip is None:
            raise UnreadablePicture(f"{root / file}: {problem}")
        skip(file, problem)
    kept = [picture for _, pictures, _ in framed for picture in pictures]
    labels = np.fromiter((picture.label for picture in kept), np.uint8, len(kept))
    return np.concatenate([images for images, _, _ in framed]), labels, kept


def _frame_chunk(
    root: Path, pictures: list[tuple[str, int]], frame: Frame
) -> tuple[np.ndarray, list[Picture], list[tuple[str, str]]]:
    """Frame some pictures: the images (n, size, size), what they were, and (file, problem) for each that
    gives no image."""
    shape = (frame.size, frame.size)
    images = np.empty((len(pictures), *shape), np.uint8)
    kept, problems = [], []
    for file, label in pictures:
        try:
            data, kind = read_file(root / file)
            if kind not in PICTURES:
                raise UnreadableInput(f"not a picture that PIL reads ({', '.join(PICTURES)}) despite its name")
            pixels, _, _ = fit_picture(decode_picture(data, kind), frame, shape)
        except UnreadableInput as error:
            problems.append((file, str(error)))
            continue
        images[len(kept)] = pixels
        kept.append(Picture(file, label, len(data), hashlib.sha256(data).hexdigest()))
    return images[: len(kept)], kept, problems


def acquire(root: Path, out: Path, frame: Frame, skip: Callable[[str, str], None] | None) -> Manifest:
    """Frame every picture of `root` into the IDX files of a registered dataset in `out`; return the manifest,
    which lists each picture (file, class, size, sha256) so that a changed picture changes the raw folder."""
    classes = find_classes(root / "train")
    splits = [split for split in SPLIT_FOLDERS if (root / split).is_dir()]  # without test/, preprocess holds one out
    if "test" in splits and (test_classes := find_classes(root / "test")) != classes:
        raise SettingError(f"{root / 'test'}: classes {list(test_classes)} differ from train/'s {list(classes)}")
    listed, found = {}, {split: list_pictures(root, split, classes) for split in splits}
    warn_not_pictures(root, [other for split in splits for other in found[split][1]])
    for split in splits:
        images, labels, pictures = frame_pictures(root, found[split][0], frame, skip)
        if not len(images):
            raise SettingError(f"{root / split}: none of its pictures could be read")
        write_idx(out / RAW_NAMES[f"{split}_images"], images)
        write_idx(out / RAW_NAMES[f"{split}_labels"], labels)
        listed[split] = [picture.listed(classes) for picture in pictures]
    log.info(
        f"{root}: "
        + ", ".join(f"{len(listed[split])} {split} pictures" for split in splits)
        + f" in {len(classes)} classes"
    )
    return Manifest(
        dataset=str(root),
        classes=classes,
        files={role: name for role, name in RAW_NAMES.items() if role.partition("_")[0] in splits},
        frame=dataclasses.asdict(frame),
        pictures=listed,
    )


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file (magic 0x0000 08 <ndim>, big-endian sizes, the bytes): the raw form the
    registered datasets have, so that preprocess reads a folder's pictures as it reads theirs."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(size.to_bytes(4, "big") for size in array.shape)
    with atomic_file(path) as temp:
        temp.write_bytes(header + np.ascontiguousarray(array).tobytes())
