"""The registry of MNIST-family datasets (files, mirrors, sizes, checksums, class names, framing) and the manifest
that says which of them a download holds.

The registry itself is data, `stages/datasets.yaml`, so that a test can register a small dataset of its
own in a copy of the project (with real checksums of the files it made) instead of a flag that turns
verification off.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from stages.core.artifacts import read_checked, write_json
from stages.core.contract import FrameRecord
from stages.core.errors import SettingError
from stages.core.files import MANIFEST

REGISTRY_FILE = Path(__file__).resolve().parent.parent / "datasets.yaml"

# The four IDX files of every MNIST-family dataset, by role.
ROLES = ("train_images", "train_labels", "test_images", "test_labels")
TRAIN_ROLES = ROLES[:2]


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """One IDX file: its name on the mirrors (gzipped) and how to recognise good bytes."""

    name: str  # e.g. train-images-idx3-ubyte.gz; stored decompressed, without .gz
    gz_md5: str | None  # md5 of the upstream .gz (torchvision's `resources`)
    gz_size: int | None
    payload_sha256: str | None  # sha256 of the decompressed IDX bytes
    payload_size: int | None

    @property
    def payload_name(self) -> str:
        return self.name.removesuffix(".gz")


@dataclasses.dataclass(frozen=True)
class Frame:
    """How the dataset made its square images from larger pictures (a light object on a dark background)."""

    size: int  # side of the square image
    box: int  # the object's longest edge is resized to this, aspect kept (MNIST: 20 inside 28)
    trim_tolerance: float  # edges closer than this fraction of 255 to the corner colour are trimmed first
    resample: Literal["nearest", "antialias"]  # subsampling (rows and columns skipped) or anti-aliased
    sharpen_sigma: float | None  # Gaussian unsharp mask after resizing, or none
    centre: Literal["box", "mass"]  # centre the resized box, or its centre of mass, in the square


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes: tuple[str, ...]
    mirrors: tuple[str, ...]
    files: dict[str, FileSpec]  # by role, see ROLES
    frame: Frame | None = None  # None: the dataset does not document it


def load_registry(path: Path = REGISTRY_FILE) -> dict[str, DatasetSpec]:
    with open(path, encoding="utf-8") as stream:
        document: dict[str, Any] = yaml.safe_load(stream)
    return {name: _dataset(name, entry) for name, entry in document.items()}


def lookup(name: str, path: Path = REGISTRY_FILE) -> DatasetSpec:
    registry = load_registry(path)
    if name not in registry:
        raise SettingError(f"{name!r} is neither a registered dataset ({', '.join(registry)}) nor a folder of pictures")
    return registry[name]


def _dataset(name: str, entry: dict[str, Any]) -> DatasetSpec:
    files = {role: FileSpec(**entry["files"][role]) for role in ROLES}
    for spec in files.values():
        if spec.gz_md5 is None and spec.payload_sha256 is None:
            # A file that nothing can verify would be accepted whatever its bytes: refuse the entry.
            raise ValueError(f"{REGISTRY_FILE.name}: {name}/{spec.name} has no checksum")
    frame = Frame(**entry["frame"]) if entry.get("frame") else None
    return DatasetSpec(name, tuple(entry["classes"]), tuple(entry["mirrors"]), files, frame)


class Manifest(BaseModel):
    """`dataset.json`, written last by a complete download: what the folder holds."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    dataset: str
    classes: tuple[str, ...]
    files: dict[str, str]  # role (see ROLES) -> file name in the same folder
    # A folder of pictures only: how they were framed (Frame's fields), and per split what each picture was
    # (file, label, size, sha256), so that changing one changes the raw folder's hash.
    frame: FrameRecord | None = None
    pictures: dict[str, list[dict[str, str | int]]] | None = None

    @model_validator(mode="after")
    def _every_role(self) -> Manifest:
        # Only a folder of pictures may lack the test pair (no test/: preprocess holds a test split out).
        folder_without_test = self.pictures is not None and "test" not in self.pictures
        if not all(role in self.files for role in (TRAIN_ROLES if folder_without_test else ROLES)):
            raise ValueError("a file for each role")
        return self

    @classmethod
    def for_dataset(cls, dataset: DatasetSpec) -> Manifest:
        files = {role: spec.payload_name for role, spec in dataset.files.items()}
        return cls(dataset=dataset.name, classes=dataset.classes, files=files)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_json(folder / MANIFEST, manifest.model_dump(mode="json", exclude_none=True))


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a downloaded folder, checked; a FileProblem naming it otherwise."""
    return read_checked(folder / MANIFEST, Manifest, "manifest", _manifest_problem)


def _manifest_problem(error: ValidationError) -> str:
    # Not JSON, not an object, or without the keys every manifest has: not what a download writes.
    unreadable = any(
        item["type"] in ("json_invalid", "model_type")
        or (item["type"] == "missing" and item["loc"] in (("classes",), ("files",)))
        for item in error.errors()
    )
    if unreadable:
        return "damaged (not the JSON the download stage writes)"
    return f"incomplete (needs dataset, classes and files {', '.join(ROLES)})"
