"""A folder of labelled pictures as the dataset: real Fashion-MNIST pictures written by the test as an
`ImageFolder` of PNGs (a seeded part of them), acquired, trained on and predicted with as a registered dataset is.

The oracles: torchvision's own `find_classes` and `make_dataset` for the classes and the order of the
pictures, and the IDX files the pictures were written from for the framed images.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import DEBIAN_MIRROR, NEEDS_REAL_DATA, PROJECT, dvc, project_env, run, set_params, stages_run
from PIL import Image

from stages.core.datasets import load_registry
from stages.core.errors import SettingError
from stages.core.folders import FOLDER_FRAME, find_classes, frame_pictures, list_pictures

ALL_STAGES = ["download", "preprocess", "train", "evaluate"]

pytestmark = NEEDS_REAL_DATA


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and labels (N,) of Debian's Fashion-MNIST `split` ("train" or "t10k")."""
    images = gzip.decompress((DEBIAN_MIRROR / f"{split}-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((DEBIAN_MIRROR / f"{split}-labels-idx1-ubyte.gz").read_bytes())
    return np.frombuffer(images, np.uint8, offset=16).reshape(-1, 28, 28), np.frombuffer(labels, np.uint8, offset=8)


def class_folder_names() -> list[str]:
    # "T-shirt/top" cannot be a folder's name.
    return [name.replace("/", "-") for name in load_registry()["fashion-mnist"].classes]


def write_image_folder(root: Path, counts: dict[str, int] | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Fashion-MNIST as `root`/{train,test}/<class>/<index>.png: `counts` pictures per split chosen by `seed`, or
    all of them (None). Returns the chosen indices per split, in the files' order within each class."""
    names = class_folder_names()
    chosen = {}
    for split, idx_split in (("train", "train"), ("test", "t10k")):
        images, labels = fashion_mnist(idx_split)
        everything = np.arange(len(images))
        count = None if counts is None else counts[split]
        indices = everything if count is None else np.sort(np.random.default_rng(seed).permutation(everything)[:count])
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for index in indices:
            Image.fromarray(images[index]).save(root / split / names[labels[index]] / f"{index:05d}.png")
        chosen[split] = indices
    return chosen


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("pictures") / "fashion pictures"
    return root, write_image_folder(root, {"train": 600, "test": 300}, seed=0)


def test_classes_and_order_are_torchvisions(pictures: tuple[Path, dict[str, np.ndarray]]) -> None:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    from torchvision.datasets.folder import find_classes as torchvision_classes

    root, _ = pictures
    names, class_to_index = torchvision_classes(str(root / "train"))
    assert list(find_classes(root / "train")) == names
    expected = [(Path(path).relative_to(root).as_posix(), label)
                for path, label in make_dataset(str(root / "train"), class_to_index, IMG_EXTENSIONS)]  # fmt: skip
    assert list_pictures(root, "train", tuple(names)) == (expected, [])


def test_framed_pictures_are_the_images_they_were_written_from(pictures: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, chosen = pictures
    images, labels = fashion_mnist("train")
    classes = find_classes(root / "train")
    framed, framed_labels, listed = frame_pictures(root, list_pictures(root, "train", classes)[0], FOLDER_FRAME, None)
    order = [int(Path(picture.file).stem) for picture in listed]  # the index each file was written from
    assert sorted(order) == sorted(chosen["train"].tolist())
    np.testing.assert_array_equal(framed, images[order])
    names = class_folder_names()
    assert [classes[label] for label in framed_labels] == [names[labels[index]] for index in order]


def test_mixed_sizes_are_framed_not_refused(tmp_path: Path) -> None:
    images, _ = fashion_mnist("t10k")
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
    Image.fromarray(images[0]).resize((84, 84), Image.Resampling.BILINEAR).save(tmp_path / "train" / "a" / "big.png")
    photo = np.full((90, 60, 3), 250, np.uint8)
    photo[10:80, 15:45] = (200, 20, 20)
    Image.fromarray(photo).save(tmp_path / "train" / "b" / "photo.jpg", quality=95)
    framed, _, _ = frame_pictures(tmp_path, list_pictures(tmp_path, "train", ("a", "b"))[0], FOLDER_FRAME, None)
    assert framed.shape == (2, 28, 28)
    assert np.abs(framed[0].astype(int) - images[0]).mean() < 0.5  # the enlargement, reduced back
    assert framed[1][:, 14].max() > 0 and framed[1][:, 0].max() == 0  # the photo trimmed, fitted and centred


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "no such folder"),
        (lambda root: (root / "train" / "only").mkdir(parents=True), "needs two classes or more"),
        (
            lambda root: [(root / "train" / name).mkdir(parents=True) for name in ("a", "b ")],
            "'b ' is not a class name",
        ),
        (  # IDX labels are bytes: a 257th class would be stored as the first
            lambda root: [(root / "train" / f"{index:03}").mkdir(parents=True) for index in range(257)],
            "257 class folders; at most 256",
        ),
    ],
)
def test_folders_a_classifier_cannot_use_are_refused(make, message: str, tmp_path: Path) -> None:
    make(tmp_path)
    with pytest.raises(SettingError, match=message):
        find_classes(tmp_path / "train")


def download(project: Path) -> subprocess.CompletedProcess:
    return run(project, "python", "-m", "stages.download", "--out", "data/raw", check=False, timeout=300)


@pytest.mark.e2e
def test_bad_folders_are_one_line_each(tiny_project: Path, tmp_path: Path) -> None:
    root = tmp_path / "bad"
    images, _ = fashion_mnist("t10k")
    for split in ("train", "test"):
        for name in ("Bag", "Coat"):
            (root / split / name).mkdir(parents=True)
            Image.fromarray(images[0]).save(root / split / name / "0.png")
    (root / "train" / "Bag" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))  # damaged
    set_params(tiny_project, **{"data.dataset": str(root)})
    result = download(tiny_project)
    assert result.returncode == 1 and "Traceback" not in result.stderr and " at 0x" not in result.stderr
    assert result.stderr == (
        f"download: error: {root}/train/Bag/1.png: damaged PNG file (cannot identify image file); "
        "fix or remove it, or set data.unreadable: skip\n"
    )
    assert not (tiny_project / "data" / "raw" / "dataset.json").exists()

    set_params(tiny_project, **{"data.unreadable": "skip"})
    result = download(tiny_project)
    assert result.returncode == 0, result.stderr
    assert f"download: warning: {root}/train/Bag/1.png: left out: damaged PNG file" in result.stderr
    manifest = json.loads((tiny_project / "data" / "raw" / "dataset.json").read_text())
    assert [entry["file"] for entry in manifest["pictures"]["train"]] == ["train/Bag/0.png", "train/Coat/0.png"]

    (root / "train" / "Bag" / "1.png").unlink()
    (root / "test" / "Coat" / "0.png").unlink()
    result = download(tiny_project)
    assert result.returncode == 1
    assert result.stderr == (
        f"download: error: data.dataset: {root}/test/Coat: no pictures (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff "
        ".webp) in this class folder; add some or remove it\n"
    )
    set_params(tiny_project, **{"data.dataset": str(tmp_path / "missing")})
    result = download(tiny_project)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "is neither a registered dataset (fashion-mnist, mnist, kmnist" in result.stderr


@pytest.mark.e2e
def test_exp_run_trains_and_evaluates_on_a_folder(
    tiny_project: Path, pictures: tuple[Path, dict[str, np.ndarray]]
) -> None:
    """`dvc exp run -S data.dataset=<folder>`: all four stages; the card carries the folder's classes and
    framing, and predict frames a new picture with that framing."""
    root, chosen = pictures
    result = dvc(tiny_project, "exp", "run", "-S", f"data.dataset={root}")
    assert stages_run(result) == ALL_STAGES
    report = json.loads((tiny_project / "metrics" / "test.json").read_text())
    assert report["accuracy"] > 0.6  # 500 training pictures, 2 epochs; chance is 0.1
    card = json.loads((tiny_project / "models" / "model.json").read_text())
    assert card["classes"] == sorted(class_folder_names()) and card["dataset"] == str(root)
    assert card["frame"] == {"size": 28, "box": 28, "trim_tolerance": 0.05, "resample": "antialias",
                             "sharpen_sigma": None, "centre": "box"}  # fmt: skip
    meta = json.loads((tiny_project / "data" / "processed" / "meta.json").read_text())
    assert meta["sizes"] == {"train": 500, "val": 100, "test": len(chosen["test"])}

    photo = np.full((90, 60, 3), 250, np.uint8)
    photo[10:80, 15:45] = (200, 20, 20)
    Image.fromarray(photo).save(tiny_project / "photo.png")
    predicted = subprocess.run(
        [sys.executable, "-m", "stages.commands.predict", "--json", "photo.png"],
        cwd=tiny_project,
        env=project_env() | {"PYTHONPATH": str(PROJECT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert predicted.returncode == 0, predicted.stderr
    (row,) = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert row["class"] in card["classes"] and "(antialias)" in row["conversion"]  # the card's frame, not Fashion's


@pytest.mark.e2e
def test_a_changed_picture_reruns_acquisition_and_what_its_data_changes(
    tiny_project: Path, pictures: tuple[Path, dict[str, np.ndarray]]
) -> None:
    """A folder under pictures/ (dvc.yaml's dep of download), versioned with `dvc add`, and dvc.yaml as it
    is: an unchanged folder reruns nothing; a picture saved again with the same pixels reruns download and
    preprocess (the manifest lists its bytes), whose data is unchanged, so nothing after; a picture that
    changed reruns every stage after acquisition."""
    root = tiny_project / "pictures" / "shoes"
    shutil.copytree(pictures[0], root)
    dvc(tiny_project, "add", "pictures/shoes")
    run(tiny_project, "git", "add", "pictures")
    run(tiny_project, "git", "commit", "-qm", "my pictures")
    exp_run = ("exp", "run", "-S", "data.dataset=pictures/shoes")
    assert stages_run(dvc(tiny_project, *exp_run)) == ALL_STAGES
    assert stages_run(dvc(tiny_project, *exp_run)) == []

    first = sorted((root / "train" / "Bag").iterdir())[0]
    Image.open(first).save(first, compress_level=1)  # other bytes, the same pixels
    assert stages_run(dvc(tiny_project, "exp", "run", "-S", "data.dataset=pictures/shoes")) == [
        "download",
        "preprocess",
    ]

    Image.fromarray(np.asarray(Image.open(first))[::-1]).save(first)  # the same bag, upside down
    assert stages_run(dvc(tiny_project, *exp_run)) == ALL_STAGES


@pytest.mark.e2e
def test_without_a_test_folder_preprocess_holds_out_a_seeded_test_split(
    tiny_project: Path, pictures: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    root = tmp_path / "train only"
    shutil.copytree(pictures[0] / "train", root / "train")
    set_params(tiny_project, **{"data.dataset": str(root), "preprocess.test_size": 600})
    assert download(tiny_project).returncode == 0
    preprocess = ("python", "-m", "stages.preprocess", "--raw", "data/raw", "--out", "data/processed")
    result = run(tiny_project, *preprocess, check=False)
    assert result.returncode == 1
    assert result.stderr == (
        "preprocess: error: preprocess.test_size: 600 is not smaller than the training set (600 images); lower it\n"
    )

    set_params(tiny_project, **{"preprocess.test_size": 150})
    run(tiny_project, *preprocess)
    meta = json.loads((tiny_project / "data" / "processed" / "meta.json").read_text())
    assert meta["sizes"] == {"train": 350, "val": 100, "test": 150}
    first = (tiny_project / "data" / "processed" / "test.safetensors").read_bytes()
    set_params(tiny_project, **{"preprocess.seed": 1})
    run(tiny_project, *preprocess)
    assert (tiny_project / "data" / "processed" / "test.safetensors").read_bytes() != first  # the seed chose


@pytest.mark.e2e
def test_every_imagefolder_format_is_read_and_other_files_are_named(tiny_project: Path, tmp_path: Path) -> None:
    """A picture in each of torchvision's IMG_EXTENSIONS is acquired (the lossless ones as the very image they
    were saved from); a file that is not a picture is named in one warning; hidden files are not."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = tmp_path / "formats"
    images, _ = fashion_mnist("t10k")
    for label, name in enumerate(("Bag", "Coat")):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for index, extension in enumerate(IMG_EXTENSIONS):
            picture = Image.fromarray(images[label * 20 + index])
            options = {"lossless": True} if extension == ".webp" else {}
            (picture.convert("RGB") if extension == ".ppm" else picture).save(folder / f"{index}{extension}", **options)
        (folder / ".DS_Store").write_bytes(bytes(10))
    (root / "train" / "Bag" / "notes.txt").write_text("where the bags came from")
    set_params(tiny_project, **{"data.dataset": str(root)})
    result = download(tiny_project)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [f"download: warning: {root}: 1 file is not pictures ({' '.join(IMG_EXTENSIONS)}) "
                        "and left out: train/Bag/notes.txt"]  # fmt: skip
    assert f"download: {root}: {2 * len(IMG_EXTENSIONS)} train pictures in 2 classes" in result.stderr
    manifest = json.loads((tiny_project / "data" / "raw" / "dataset.json").read_text())
    listed = [entry["file"] for entry in manifest["pictures"]["train"]]
    assert sorted(Path(file).suffix for file in listed) == sorted(2 * IMG_EXTENSIONS)
    raw = (tiny_project / "data" / "raw" / "train-images-idx3-ubyte").read_bytes()
    acquired = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    for (position, file), image in zip(enumerate(listed), acquired, strict=True):
        label, index = ("Bag", "Coat").index(file.split("/")[1]), int(Path(file).stem)
        if not file.endswith((".jpg", ".jpeg")):
            np.testing.assert_array_equal(image, images[label * 20 + index], err_msg=f"{position}: {file}")


@pytest.mark.e2e
def test_default_split_sizes_fit_a_folder_of_a_few_hundred_pictures(tiny_project: Path, tmp_path: Path) -> None:
    """params.yaml's own val_size and test_size (fractions) on a folder without test/: the stages run."""
    root = tmp_path / "few"
    images, _ = fashion_mnist("t10k")
    for name in ("Bag", "Coat"):
        (root / "train" / name).mkdir(parents=True)
    for index in range(300):
        Image.fromarray(images[index]).save(root / "train" / ("Bag", "Coat")[index % 2] / f"{index}.png")
    committed = yaml.safe_load((PROJECT / "params.yaml").read_text())["preprocess"]
    set_params(
        tiny_project, **{"data.dataset": str(root)}, **{f"preprocess.{key}": value for key, value in committed.items()}
    )
    assert download(tiny_project).returncode == 0
    run(tiny_project, "python", "-m", "stages.preprocess", "--raw", "data/raw", "--out", "data/processed")
    meta = json.loads((tiny_project / "data" / "processed" / "meta.json").read_text())
    test = math.ceil(300 * committed["test_size"])
    val = math.ceil((300 - test) * committed["val_size"])
    assert meta["sizes"] == {"train": 300 - test - val, "val": val, "test": test} and val >= 10 and test >= 10


@pytest.mark.e2e
def test_a_folder_dvc_cannot_see_is_named_at_each_run_and_its_import_is_seen_to_change(
    tiny_project: Path, tmp_path: Path
) -> None:
    """A folder outside the project: each run of download says that DVC cannot see it change, and how to
    make it seen; imported as the line says (`dvc import-url`), a changed picture reruns download once
    `dvc update` took it."""
    outside = tmp_path / "outside" / "shoes"
    write_image_folder(outside, {"train": 60, "test": 20})
    set_params(tiny_project, **{"data.dataset": str(outside)})
    result = dvc(tiny_project, "repro", "download")
    fix = f"import it into the project: dvc import-url {outside} pictures/shoes"
    assert (
        f"download: warning: data.dataset: DVC does not see {outside} (no dep of download holds it): a changed "
        f"picture there reruns nothing; {fix}, and set data.dataset: pictures/shoes (docs/own-images.md)"
    ) in result.stderr.splitlines(), result.stderr

    dvc(tiny_project, "import-url", str(outside), "pictures/shoes")
    set_params(tiny_project, **{"data.dataset": "pictures/shoes"})
    result = dvc(tiny_project, "repro", "download")
    assert stages_run(result) == ["download"] and "does not see" not in result.stderr, result.stderr
    first = sorted((outside / "train" / "Bag").iterdir())[0]
    Image.fromarray(np.asarray(Image.open(first))[::-1]).save(first)  # the same bag, upside down
    dvc(tiny_project, "update", "pictures/shoes.dvc")
    assert stages_run(dvc(tiny_project, "repro", "download")) == ["download"]
    manifest = json.loads((tiny_project / "data" / "raw" / "dataset.json").read_text())
    (entry,) = [entry for entry in manifest["pictures"]["train"] if entry["file"] == f"train/Bag/{first.name}"]
    assert entry["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
