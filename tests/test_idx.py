"""IDX parsing in preprocess: every header defect is a one-line error naming the file, and nothing is written."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import dvc, idx_bytes, register_dataset, run, set_params, write_dataset
from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

from stages.cli import explain
from stages.core.errors import FileProblem
from stages.core.idx import read_idx, read_split

REFETCH = "re-download it: dvc repro --force download"
IMAGES = torch.arange(6 * 4 * 3, dtype=torch.uint8).view(6, 4, 3)  # (N, H, W)
LABELS = torch.tensor([0, 1, 2, 9, 4, 5], dtype=torch.uint8)


def write(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


def test_good_files_read_as_torchvision_reads_them(tmp_path: Path) -> None:
    images = write(tmp_path, "images", idx_bytes(IMAGES))
    labels = write(tmp_path, "labels", idx_bytes(LABELS))
    read_images, read_labels = read_split(images, labels, num_classes=10)
    # torchvision's reader is the independent oracle for the format.
    assert torch.equal(read_images, read_sn3_pascalvincent_tensor(str(images)))
    assert torch.equal(read_images, IMAGES)
    assert read_labels.dtype == torch.int64 and read_labels.tolist() == LABELS.tolist()


@pytest.mark.parametrize(
    ("content", "dimensions", "message"),
    [
        (
            b"\x00\x00\x0d\x03" + idx_bytes(IMAGES)[4:],  # element type 0x0D: float32
            3,
            "bad IDX magic number 0x00000d03; expected 0x00000803 (unsigned bytes, 3 dimensions); " + REFETCH,
        ),
        (
            b"\x12\x34" + idx_bytes(IMAGES)[2:],
            3,
            "bad IDX magic number 0x12340803; expected 0x00000803 (unsigned bytes, 3 dimensions); " + REFETCH,
        ),
        (gzip.compress(idx_bytes(IMAGES)), 3, "still gzip-compressed, not an IDX file; " + REFETCH),
        (b"\x00\x00", 1, "not an IDX file (only 2 bytes); " + REFETCH),
        (
            idx_bytes(IMAGES),
            1,
            "IDX file has 3 dimensions, expected 1 (labels: count); is it the right file of the pair?",
        ),
        (
            idx_bytes(LABELS),
            3,
            "IDX file has 1 dimensions, expected 3 (images: count, height, width); is it the right file of the pair?",
        ),
        (idx_bytes(IMAGES)[:10], 3, "IDX header truncated (10 bytes, needs 16); " + REFETCH),
        (
            idx_bytes(IMAGES)[:-5],
            3,
            "header says 6x4x3 values (88 bytes) but the file has 83 bytes (truncated); " + REFETCH,
        ),
        (
            idx_bytes(LABELS) + b"\x00",
            1,
            "header says 6 values (14 bytes) but the file has 15 bytes (trailing bytes); " + REFETCH,
        ),
    ],
    ids=["element-type", "magic", "gzipped", "tiny", "images-as-labels", "labels-as-images", "header", "data", "extra"],
)
def test_header_defects_name_the_file_and_the_defect(
    tmp_path: Path, content: bytes, dimensions: int, message: str
) -> None:
    path = write(tmp_path, "t10k-images-idx3-ubyte", content)
    with pytest.raises(FileProblem) as error:
        read_idx(path, dimensions)
    assert explain(error.value) == f"{path}: {message}"  # the line the stage prints


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileProblem) as error:
        read_idx(tmp_path / "train-labels-idx1-ubyte", 1)
    assert explain(error.value).endswith(
        "train-labels-idx1-ubyte: missing; rerun the download stage (dvc repro download)"
    )


def test_counts_must_agree_between_images_and_labels(tmp_path: Path) -> None:
    images = write(tmp_path, "train-images-idx3-ubyte", idx_bytes(IMAGES))
    labels = write(tmp_path, "train-labels-idx1-ubyte", idx_bytes(LABELS[:5]))
    with pytest.raises(FileProblem) as error:
        read_split(images, labels, num_classes=10)
    assert explain(error.value) == (
        f"{labels}: 5 labels for 6 images in train-images-idx3-ubyte; "
        "the files belong to different datasets or one is damaged"
    )


def test_labels_must_be_within_the_classes(tmp_path: Path) -> None:
    images = write(tmp_path, "train-images-idx3-ubyte", idx_bytes(IMAGES))
    labels = write(tmp_path, "train-labels-idx1-ubyte", idx_bytes(LABELS))
    assert len(read_split(images, labels, num_classes=10)[1]) == 6  # 9 is the largest label: 10 classes fit
    with pytest.raises(FileProblem) as error:
        read_split(images, labels, num_classes=9)
    assert explain(error.value) == (
        f"{labels}: label 9 is outside the 9 classes (0..8); the labels do not belong to this dataset's class list"
    )


def preprocess(project: Path) -> subprocess.CompletedProcess:
    return run(
        project, "python", "-m", "stages.preprocess", "--raw", "data/raw", "--out", "data/processed", check=False
    )


@pytest.mark.parametrize(
    ("file", "damage", "message"),
    [
        (
            "t10k-images-idx3-ubyte",
            lambda data: data[:-784],
            "header says 200x28x28 values (156816 bytes) but the file has 156032 bytes (truncated); " + REFETCH,
        ),
        (
            "train-labels-idx1-ubyte",
            lambda data: data[:8] + b"\x0a" + data[9:],
            "label 10 is outside the 10 classes (0..9); the labels do not belong to this dataset's class list",
        ),
    ],
    ids=["truncated-images", "label-out-of-range"],
)
@pytest.mark.e2e
def test_preprocess_stage_fails_in_one_line_and_leaves_processed_alone(
    tiny_project: Path, file: str, damage: Callable[[bytes], bytes], message: str
) -> None:
    run(tiny_project, "python", "-m", "stages.download", "--out", "data/raw")
    run(tiny_project, "python", "-m", "stages.preprocess", "--raw", "data/raw", "--out", "data/processed")
    processed = tiny_project / "data" / "processed"
    before = {path.name: path.read_bytes() for path in processed.iterdir()}

    raw_file = tiny_project / "data" / "raw" / file
    raw_file.write_bytes(damage(raw_file.read_bytes()))
    result = preprocess(tiny_project)
    assert result.returncode == 1
    assert result.stderr == f"preprocess: error: data/raw/{file}: {message}\n"
    assert {path.name: path.read_bytes() for path in processed.iterdir()} == before
    assert sorted(path.name for path in (tiny_project / "data").iterdir()) == ["processed", "raw"]


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        ('{"dataset": "tiny", "classes": [', "damaged (not the JSON the download stage writes)"),
        ('{"dataset": "tiny", "classes": ["a"], "files": {}}', "incomplete (needs dataset, classes and files "),
        (  # only a folder of pictures may come without its test pair
            '{"dataset": "tiny", "classes": ["a"], "files": {"train_images": "train-images-idx3-ubyte", '
            '"train_labels": "train-labels-idx1-ubyte"}}',
            "incomplete (needs dataset, classes and files ",
        ),
    ],
    ids=["not-json", "no-files", "no-test-files"],
)
@pytest.mark.e2e
def test_a_damaged_manifest_is_one_line_not_a_traceback(tiny_project: Path, manifest: str, problem: str) -> None:
    run(tiny_project, "python", "-m", "stages.download", "--out", "data/raw")
    (tiny_project / "data" / "raw" / "dataset.json").write_text(manifest)
    result = preprocess(tiny_project)
    assert result.returncode == 1
    assert result.stderr.startswith(f"preprocess: error: data/raw/dataset.json: {problem}")
    assert result.stderr.endswith("; rerun the download stage (dvc repro --force download)\n")
    assert result.stderr.count("\n") == 1
    assert not (tiny_project / "data" / "processed").exists()


@pytest.mark.e2e
def test_dvc_repro_stops_at_a_registered_dataset_with_bad_labels(tiny_project: Path, tmp_path: Path) -> None:
    """A registry entry whose checksums are right for broken files: download accepts them, preprocess must not."""
    entry = write_dataset(tmp_path / "bad-mirror", seed=3)
    labels = torch.tensor([0, 1, 2, 3, 12] * 40, dtype=torch.uint8)  # 200 test labels, one class too many
    payload = idx_bytes(labels)
    compressed = gzip.compress(payload, mtime=0)
    (tmp_path / "bad-mirror" / "t10k-labels-idx1-ubyte.gz").write_bytes(compressed)
    entry["files"]["test_labels"].update(
        gz_md5=hashlib.md5(compressed).hexdigest(),
        gz_size=len(compressed),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_size=len(payload),
    )
    register_dataset(tiny_project, "bad-labels", entry)
    set_params(tiny_project, **{"data.dataset": "bad-labels"})

    result = dvc(tiny_project, "repro", "preprocess", check=False)
    assert result.returncode != 0
    assert "Running stage 'download'" in result.stdout
    assert (
        "preprocess: error: data/raw/t10k-labels-idx1-ubyte: label 12 is outside the 10 classes (0..9); "
        "the labels do not belong to this dataset's class list\n" in result.stderr
    )
    assert not (tiny_project / "data" / "processed").exists()
