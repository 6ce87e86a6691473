"""The pipeline on the real Fashion-MNIST (offline, from Debian's package) in one stranger's checkout: the
committed dvc.lock reproduced, each model's accuracy floor, other CPUs' numerics within the README's tolerance,
the test set enlarged through predict's framing, and the whole dataset as a folder of PNGs.

One checkout for all of them (the real data is downloaded and preprocessed once), in a path with a space
and a non-ASCII letter, as a stranger's may be. The tests run in this file's order: the first ones read
the checkout as `dvc repro` left it, the later ones add experiments to it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import NEEDS_REAL_DATA, RECIPES, copy_project, dvc, init_repo, recipe_line, run, run_stage, stages_run
from PIL import Image
from test_own_images import fashion_mnist, write_image_folder

from stages.core.datasets import load_registry
from stages.core.images import fit_picture
from stages.core.inference import load_classifier

# The Fashion-MNIST paper's LogisticRegression baseline (benchmark/baselines.json in its repository).
ACCURACY_FLOOR = 0.842
# What the README promises about other numerics (Reproducibility), measured here with the unpinned kernels.
METRIC_TOLERANCE = {"accuracy": 0.002, "loss": 0.002}
# Two processes of a thread each (a 2-core machine), as the README gives them (Training on several processes).
TWO_PROCESSES = {"train.processes": 2, "train.threads": 1}
# Issue 20: an enlarged dataset image keeps the accuracy of the 28x28 one within half a point.
ENLARGED_TOLERANCE = 0.005
# Issue 23: the folder route trains to the IDX route's accuracy within this.
ROUTE_TOLERANCE = 0.002

pytestmark = [pytest.mark.slow, pytest.mark.e2e, NEEDS_REAL_DATA]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's files with its committed results, committed into a fresh repository, after
    `dvc repro --force` (without it, evaluate would rightly be skipped: its outputs are the committed ones)."""
    project = init_repo(copy_project(tmp_path_factory.mktemp("real") / "a fresh clone, ü", keep_results=True), "clone")
    first = dvc(project, "repro", "--force", timeout=1200)
    assert stages_run(first) == ["download", "preprocess", "train", "evaluate"]
    return project


def test_a_fresh_checkout_reproduces_the_committed_lock(checkout: Path) -> None:
    """Every hash of the committed dvc.lock, the committed metrics byte for byte, a clean `git status`."""
    committed = run(checkout, "git", "show", "HEAD:dvc.lock").stdout
    assert yaml.safe_load((checkout / "dvc.lock").read_text()) == yaml.safe_load(committed)
    assert run(checkout, "git", "status", "--porcelain").stdout == ""
    assert stages_run(dvc(checkout, "repro")) == []


def test_the_logreg_reaches_the_papers_baseline(checkout: Path) -> None:
    report = json.loads((checkout / "metrics" / "test.json").read_text())
    card = json.loads((checkout / "models" / "model.json").read_text())
    assert card["dataset"] == "fashion-mnist" and card["architecture"]["model"] == "logreg"
    assert report["accuracy"] >= ACCURACY_FLOOR, report
    meta = json.loads((checkout / "data" / "processed" / "meta.json").read_text())
    assert meta["sizes"] == {"train": 55000, "val": 5000, "test": 10000}
    onnx_agrees_with_evaluate(checkout)


def onnx_agrees_with_evaluate(checkout: Path) -> None:
    """What predict runs, models/model.onnx in ONNX Runtime, against the evaluate stage on the test split: the
    same class for at least 99.9 % of the images, logits within 1e-4 of the torch model's."""
    import torch
    from safetensors.numpy import load_file

    from stages.core.model import load_model

    images = load_file(str(checkout / "data" / "processed" / "test.safetensors"))["images"]
    onnx_model, card = load_classifier(checkout / "models")
    logits = onnx_model(images)
    with open(checkout / "metrics" / "confusion.csv", newline="") as stream:
        evaluated = [row["predicted"] for row in csv.DictReader(stream)]  # one row per test image, in order
    same = np.mean([card.classes[index] == name for index, name in zip(logits.argmax(1), evaluated, strict=True)])
    torch_model, _ = load_model(checkout / "models")
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images)).numpy()
    print(f"{card.architecture.model}: the same class as evaluate for {same:.4%}, max |logit difference| "
          f"{np.abs(logits - expected).max():.1e}")  # fmt: skip
    assert same >= 0.999
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def logreg_on_test_set(checkout: Path) -> tuple[Callable, np.ndarray, np.ndarray, float]:
    """The committed logreg (read before the recipes replace it), the 10,000 test images and labels, and its
    accuracy on them at 28x28: read once for every enlargement."""
    model, _ = load_classifier(checkout / "models")
    images, labels = fashion_mnist("t10k")
    return model, images, labels, (model(images).argmax(1) == labels).mean()


@pytest.mark.parametrize("factor", [2, 3, 4, 10])
@pytest.mark.parametrize("resample", ["NEAREST", "BILINEAR"])
def test_enlarged_test_images_keep_the_accuracy(logreg_on_test_set, factor: int, resample: str) -> None:
    """The 10,000 test images enlarged (half of them in colour, dark on light) and framed as predict frames a
    picture: the model's accuracy within ENLARGED_TOLERANCE of its accuracy on the 28x28 images."""
    from threadpoolctl import threadpool_limits

    model, images, labels, as_is = logreg_on_test_set
    frame = load_registry()["fashion-mnist"].frame
    framed = np.empty_like(images)
    # One BLAS thread: the reduction's products are small, and threads fighting for 2 shared cores cost 30x.
    with threadpool_limits(1):
        for index, image in enumerate(images):
            light = index % 2 == 1
            shown = Image.fromarray(255 - image if light else image).convert("RGB" if light else "L")
            picture = shown.resize((28 * factor, 28 * factor), Image.Resampling[resample])
            framed[index], _, _ = fit_picture(picture, frame, (28, 28))
    enlarged = (model(framed).argmax(1) == labels).mean()
    print(f"{factor}x {resample.lower()}: accuracy {enlarged:.4f}, at 28x28 {as_is:.4f}")
    assert enlarged == pytest.approx(as_is, abs=ENLARGED_TOLERANCE), (as_is, enlarged)


def test_other_numerics_agree_within_the_readme_tolerance(checkout: Path) -> None:
    """Where bytes cannot match (another CPU's own kernels, as on aarch64 or without the pin), the metrics
    still agree within METRIC_TOLERANCE: measured with the unpinned x86-64 kernels."""
    committed = json.loads((checkout / "metrics" / "test.json").read_text())
    other_cpu = {"ATEN_CPU_CAPABILITY": "default", "OPENBLAS_CORETYPE": "Sandybridge"}
    other = checkout.parent / "other-cpu"
    run_stage(checkout, "stages.train", "--data", "data/processed", "--out", str(other / "models"),
              variant=other_cpu, pinned=False)  # fmt: skip
    run_stage(checkout, "stages.evaluate", "--data", "data/processed", "--model", str(other / "models"),
              "--out", str(other / "metrics"), variant=other_cpu, pinned=False)  # fmt: skip
    report = json.loads((other / "metrics" / "test.json").read_text())
    assert report["accuracy"] == pytest.approx(committed["accuracy"], abs=METRIC_TOLERANCE["accuracy"])
    assert report["loss"] == pytest.approx(committed["loss"], abs=METRIC_TOLERANCE["loss"])


def test_two_processes_reach_the_baseline_as_one_does(checkout: Path) -> None:
    """The README's line for two processes: it retrains and evaluates, nothing else, and agrees with the
    committed 1-process run within the tolerance measured there; the checkout is put back afterwards."""
    one = json.loads((checkout / "metrics" / "test.json").read_text())
    result = dvc(checkout, "exp", "run", *(f"-S{key}={value}" for key, value in TWO_PROCESSES.items()))
    assert stages_run(result) == ["train", "evaluate"]
    two = json.loads((checkout / "metrics" / "test.json").read_text())
    assert json.loads((checkout / "models" / "model.json").read_text())["recipe"]["processes"] == 2
    run(checkout, "git", "checkout", "--", ".")  # the recipes below start from the committed params
    dvc(checkout, "checkout", "--force")
    assert two["accuracy"] >= ACCURACY_FLOOR, two
    # Measured (README, Training on several processes): 0.8453 against 0.8454, the loss equal to 6 decimals.
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=0.001), (one, two)
    assert two["loss"] == pytest.approx(one["loss"], abs=0.001), (one, two)


@pytest.mark.parametrize("model", sorted(RECIPES))
def test_each_recipe_reaches_its_floor(model: str, checkout: Path) -> None:
    changes, floor = RECIPES[model]
    dvc(checkout, "exp", "run", *(f"-Strain.{key}={value}" for key, value in changes.items()), timeout=1200)
    report = json.loads((checkout / "metrics" / "test.json").read_text())
    card = json.loads((checkout / "models" / "model.json").read_text())
    assert card["architecture"]["model"] == model
    assert report["accuracy"] >= floor, report
    onnx_agrees_with_evaluate(checkout)


def test_a_network_of_your_own_predicts_as_evaluate_did(checkout: Path) -> None:
    """The README's example network, one epoch: its model.onnx gives evaluate's classes, as the built-ins' do."""
    dvc(checkout, "exp", "run", "-S", "train.model=nets/wide.py:WideNet", "-S", "train.epochs=1", timeout=1200)
    assert json.loads((checkout / "models" / "model.json").read_text())["onnx"]["file"] == "model.onnx"
    onnx_agrees_with_evaluate(checkout)


def test_readme_gives_the_recipes_tested_here() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for model in RECIPES:
        assert recipe_line(model) in readme, recipe_line(model)
    two_processes = "dvc exp run " + " ".join(f"-S {key}={value}" for key, value in TWO_PROCESSES.items())
    assert two_processes in readme, two_processes


def test_the_whole_dataset_as_a_folder_trains_as_the_idx_files_do(checkout: Path, tmp_path: Path) -> None:
    """The same 70,000 pictures as PNGs, through `dvc exp run -S data.dataset=<folder>` on the committed params
    (the logreg): the accuracy of the committed IDX run within ROUTE_TOLERANCE."""
    run(checkout, "git", "checkout", "-q", "--", ".")  # the committed params, not the last recipe's
    idx_route = json.loads(run(checkout, "git", "show", "HEAD:metrics/test.json").stdout)
    root = tmp_path / "fashion-mnist pictures"
    write_image_folder(root, None)
    result = dvc(checkout, "exp", "run", "-S", f"data.dataset={root}", timeout=1800)
    assert stages_run(result) == ["download", "preprocess", "train", "evaluate"]
    folder_route = json.loads((checkout / "metrics" / "test.json").read_text())
    meta = json.loads((checkout / "data" / "processed" / "meta.json").read_text())
    assert meta["sizes"] == {"train": 55000, "val": 5000, "test": 10000} and meta["dataset"] == str(root)
    print(f"accuracy: folder route {folder_route['accuracy']}, IDX route {idx_route['accuracy']}")
    assert folder_route["accuracy"] == pytest.approx(idx_route["accuracy"], abs=ROUTE_TOLERANCE), (
        idx_route,
        folder_route,
    )
