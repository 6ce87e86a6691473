"""Using a released model from outside the project, as the README's "Use the model elsewhere" says.

A teammate runs the tiny pipeline, pushes to the project's default remote (a folder under a `~` of the
test's own), and registers the model with GTO (`classifier@v1.0.0`); then, from a directory that is not
a DVC project, `dvc artifacts get` fetches that version from the git URL and `stages.commands.predict` classifies
PNGs made from test images: each gets the class the evaluate stage gave that image.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import PROJECT, TINY, dvc, project_env, run, set_params
from PIL import Image
from safetensors.numpy import load_file
from team import clone, commit_and_push, fingerprint, make_origin

pytestmark = pytest.mark.e2e

NAME, VERSION = "classifier", "v1.0.0"
SAMPLES = 12  # test images written as PNGs, three ways each


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory):
    """A home of its own, so that the default remote `~/dvc-storage/...` points into the test."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        yield home


def frame_like_fashion_mnist(project: Path) -> None:
    """Give the tiny dataset Fashion-MNIST's framing, so that predict fits pictures as it would for it."""
    registry_file = project / "stages" / "datasets.yaml"
    registry = yaml.safe_load(registry_file.read_text())
    registry[TINY]["frame"] = registry["fashion-mnist"]["frame"]
    registry_file.write_text(yaml.safe_dump(registry, sort_keys=False))
    run(project, "git", "commit", "-qam", "frame the tiny dataset like Fashion-MNIST")


def release(project: Path, version: str) -> None:
    """Register a version as GTO does (an annotated tag name@version) and push the tag."""
    run(project, "gto", "register", NAME, "--version", version)
    run(project, "git", "push", "-q", "origin", f"{NAME}@{version}")


@pytest.fixture(scope="module")
def alice(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    alice = clone(make_origin(root, configure=frame_like_fashion_mnist), root / "alice")
    dvc(alice, "repro")
    commit_and_push(alice, "results")
    dvc(alice, "push")
    release(alice, VERSION)
    return alice


def artifacts_get(where: Path, origin: Path, version: str, *options: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    dvc(where, "artifacts", "get", str(origin), NAME, "--rev", version, "-o", "model", *options)
    return where / "model"


def write_pngs(alice: Path, folder: Path) -> dict[str, int]:
    """Test images as PNGs, at 28x28, upscaled 4x in RGB, and inverted on white at 3x; name -> test index."""
    images = load_file(str(alice / "data" / "processed" / "test.safetensors"))["images"]
    folder.mkdir()
    written = {}
    for index in range(SAMPLES):
        image = Image.fromarray(images[index])
        image.save(folder / f"{index}-28.png")
        image.resize((112, 112), Image.Resampling.NEAREST).convert("RGB").save(folder / f"{index}-rgb.png")
        inverted = Image.fromarray(255 - images[index]).resize((84, 84), Image.Resampling.NEAREST)
        inverted.convert("RGB").save(folder / f"{index}-white.png")
        written |= {f"{index}-28.png": index, f"{index}-rgb.png": index, f"{index}-white.png": index}
    return written


def evaluated_classes(alice: Path) -> list[str]:
    """The class the evaluate stage predicted for each test image: confusion.csv has one row per image, in order."""
    with open(alice / "metrics" / "confusion.csv", newline="") as stream:
        return [row["predicted"] for row in csv.DictReader(stream)]


def predict(cwd: Path, code: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m stages.commands.predict` with `code`'s stages on the path, as if that version were installed."""
    env = project_env() | {"PYTHONPATH": str(code)}
    command = [sys.executable, "-m", "stages.commands.predict", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_released_version_is_fetched_elsewhere_and_predicts_as_evaluate_did(alice: Path, tmp_path: Path) -> None:
    origin = alice.parent / "origin.git"
    model = artifacts_get(tmp_path / "elsewhere", origin, VERSION)
    assert fingerprint(model.parent, ("model",)) == {
        path.replace("models/", "model/", 1): digest for path, digest in fingerprint(alice, ("models",)).items()
    }

    pictures = write_pngs(alice, tmp_path / "elsewhere" / "pictures")
    result = predict(tmp_path / "elsewhere", alice, "pictures", "--model", "model", "--json")
    assert result.returncode == 0, result.stderr
    rows = {Path(row["file"]).name: row for row in map(json.loads, result.stdout.splitlines())}
    expected = evaluated_classes(alice)
    assert {name: row["class"] for name, row in rows.items()} == {
        name: expected[index] for name, index in pictures.items()
    }
    assert all(row["inverted"] == name.endswith("-white.png") for name, row in rows.items())


def test_a_version_stays_what_it_was_after_the_next_run(alice: Path, tmp_path: Path) -> None:
    """`--rev v1.0.0` is the tag, not the branch: retraining and pushing on main leaves that version alone."""
    origin = alice.parent / "origin.git"
    bob = clone(origin, tmp_path / "bob")
    dvc(bob, "pull")
    set_params(bob, **{"train.lr": 0.01})
    dvc(bob, "repro", "train")
    commit_and_push(bob, "train with lr 0.01")
    dvc(bob, "push")
    release(bob, "v1.1.0")

    old = artifacts_get(tmp_path / "old", origin, VERSION)
    new = artifacts_get(tmp_path / "new", origin, "v1.1.0")
    weights = "model.safetensors"
    assert (old / weights).read_bytes() == (alice / "models" / weights).read_bytes()
    assert (new / weights).read_bytes() == (bob / "models" / weights).read_bytes()
    old_weights, new_weights = load_file(str(old / weights)), load_file(str(new / weights))
    assert old_weights.keys() == new_weights.keys()
    assert any(not np.array_equal(old_weights[name], new_weights[name]) for name in old_weights)


def readme_onnx_lines() -> str:
    """The README's lines that classify a picture with ONNX Runtime alone (its one ```python block)."""
    readme = (PROJECT / "README.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    return block


def onnx_only_venv(folder: Path) -> Path:
    """A venv without pip whose site-packages hold onnxruntime, numpy and Pillow alone (linked from this
    venv's, so the test needs no network): no torch, none of this project. Its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    (site,) = folder.glob("lib/python*/site-packages")
    for name in ("onnxruntime", "numpy", "pillow"):
        distribution = metadata.distribution(name)
        tops = {Path(str(file)).parts[0] for file in distribution.files or ()} - {".."}  # .. : its scripts in bin/
        for top in tops:
            (site / top).symlink_to(distribution.locate_file(top))
    return folder / "bin" / "python"


def test_the_model_folder_runs_with_onnx_runtime_alone(alice: Path, tmp_path: Path) -> None:
    """models/ as `dvc repro` wrote it, copied where there is no project, classified by the README's lines in a
    venv of onnxruntime, numpy and Pillow: the class evaluate gave each test image, on dark and on light."""
    shutil.copytree(alice / "models", tmp_path / "model")
    python = onnx_only_venv(tmp_path / "venv")
    env = {key: value for key, value in project_env().items() if key != "PYTHONPATH"}
    for module in ("torch", "stages"):
        found = subprocess.run([python, "-c", f"import {module}"], cwd=tmp_path, env=env, capture_output=True)
        assert found.returncode != 0, f"{module} imports in the venv"
    images = load_file(str(alice / "data" / "processed" / "test.safetensors"))["images"]
    expected = evaluated_classes(alice)
    (tmp_path / "classify.py").write_text(readme_onnx_lines())
    for index in range(4):
        light = index % 2 == 1  # a dark object on a light background: inverted by the README's lines too
        Image.fromarray(255 - images[index] if light else images[index]).save(tmp_path / "picture.png")
        result = subprocess.run(
            [python, "classify.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected[index], (index, light)
