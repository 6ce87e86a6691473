"""Predicting from files: the model's refusals, the dataset's framing, and the command line's one-line errors.

No DVC here (the command-line tests start `python -m stages.commands.predict`, so they are marked e2e): the model
is a freshly initialised logreg saved the way the train stage saves one, weights, card and model.onnx, and
the oracle for every prediction is that model's own forward pass in torch on the same pixels.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import NEEDS_REAL_DATA, PROJECT, idx_bytes, project_env, synthetic_split
from PIL import Image
from test_own_images import fashion_mnist

from stages.core.contract import Card, ImageInputError
from stages.core.datasets import load_registry
from stages.core.export import save_with_onnx
from stages.core.images import fit_picture
from stages.core.inference import load_classifier
from stages.core.model import architecture_for, build_model, load_model
from stages.core.splits import Meta

CLASSES = tuple(f"class {k}" for k in range(10))
META = Meta(dataset="fashion-mnist", classes=CLASSES, image_shape=(28, 28), sizes={"train": 1}, mean=0.3, std=0.35)
FASHION = load_registry()["fashion-mnist"].frame
MNIST = load_registry()["mnist"].frame


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    architecture = architecture_for("logreg", (), META)
    card = Card(architecture=architecture, classes=CLASSES, dataset="fashion-mnist")
    assert save_with_onnx(folder, build_model(architecture), card) is None
    return folder


def predict_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = project_env() | {"PYTHONPATH": str(PROJECT)}  # this checkout's stages, from any directory
    return subprocess.run(
        [sys.executable, "-m", "stages.commands.predict", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(4, 28, 28), r"got torch.float32 pixels; the model takes uint8 pixels 0-255: .*\* 255\).round\(\)"),
        (torch.zeros(28, 28, dtype=torch.uint8), r"one image of shape \(28, 28\).*batch of one, images\[None\]"),
        (torch.zeros(4, 32, 32, dtype=torch.uint8), r"got 32x32 images; the model takes 28x28 images"),
        (torch.zeros(4, 784, dtype=torch.uint8), r"got 2 dimensions \(4, 784\); the model takes a batch of 28x28"),
    ],
)
def test_model_refuses_what_it_cannot_score(model_dir: Path, images: torch.Tensor, message: str) -> None:
    model, _ = load_model(model_dir)
    with pytest.raises(ImageInputError, match=message):
        model(images)
    onnx_model, _ = load_classifier(model_dir)  # what the command line runs: the same refusal
    with pytest.raises(ImageInputError, match=message.replace("torch.float32", "float32")):
        onnx_model(images.numpy())


@pytest.mark.parametrize(("kind", "hidden"), [("logreg", ()), ("mlp", (32, 16)), ("cnn", (16,))])
def test_onnx_runtime_computes_the_models_logits(kind: str, hidden: tuple[int, ...], tmp_path: Path) -> None:
    """What predict runs, model.onnx in ONNX Runtime, gives the torch model's logits and classes."""
    torch.manual_seed(1)
    architecture = architecture_for(kind, hidden, META, channels=(4, 8))
    model = build_model(architecture).eval()
    assert save_with_onnx(tmp_path, model, Card(architecture=architecture, classes=CLASSES, dataset="x")) is None
    images, _ = synthetic_split(2500, seed=2)  # more than one of ONNX Runtime's batches
    with torch.no_grad():
        expected = model(images).numpy()
    onnx_model, _ = load_classifier(tmp_path)
    got = onnx_model(images.numpy())
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.999


def test_fashion_frame_trims_fits_centres_and_inverts() -> None:
    # A dark 20x80 object on a light 60x100 picture: trimmed to 20x80, longest edge to 28 (7x28),
    # centred in 28x28 ((28 - 7) // 2 = 10 columns left), negated. Sharpening keeps a flat block flat.
    picture = np.full((100, 60, 3), 253, np.uint8)
    picture[10:90, 20:40] = (40, 0, 90)  # dark on light
    pixels, inverted, conversion = fit_picture(Image.fromarray(picture), FASHION, (28, 28))
    expected = np.zeros((28, 28), np.uint8)
    expected[:, 10:17] = 255 - Image.new("RGB", (1, 1), (40, 0, 90)).convert("L").getpixel((0, 0))
    assert inverted and conversion.startswith("inverted, 60x100 trimmed to 20x80, fitted 7x28")
    np.testing.assert_array_equal(pixels, expected)


def test_mnist_frame_fits_20_pixels_and_centres_the_mass() -> None:
    picture = np.full((300, 400), 255, np.uint8)  # a dark stroke in a corner of a white page
    picture[20:120, 30:60] = 0
    picture[20:40, 30:100] = 0
    pixels, inverted, _ = fit_picture(Image.fromarray(picture), MNIST, (28, 28))
    rows, columns = np.flatnonzero(pixels.any(1)), np.flatnonzero(pixels.any(0))
    assert inverted and (rows[-1] - rows[0] + 1, columns[-1] - columns[0] + 1) == (20, 14)
    weights = pixels.astype(np.float64) / pixels.sum()
    centre = (weights.sum(1) @ np.arange(28) + 0.5, weights.sum(0) @ np.arange(28) + 0.5)
    assert np.allclose(centre, 14, atol=0.5)


def test_picture_at_the_model_size_is_taken_as_is() -> None:
    images, _ = synthetic_split(4, seed=3)  # dark backgrounds, as the dataset's
    for image in images.numpy():
        pixels, inverted, _ = fit_picture(Image.fromarray(image), FASHION, (28, 28))
        np.testing.assert_array_equal(pixels, image)
        assert not inverted
        pixels, inverted, conversion = fit_picture(Image.fromarray(255 - image).convert("RGB"), FASHION, (28, 28))
        np.testing.assert_array_equal(pixels, image)
        assert inverted and conversion == "28x28 as is, inverted"


@pytest.mark.parametrize("factor", [2, 3, 4, 10])
@pytest.mark.parametrize("resample", ["NEAREST", "BILINEAR", "BICUBIC"])
def test_an_enlarged_dataset_image_is_reduced_to_the_original(factor: int, resample: str) -> None:
    """Grey or colour, either polarity: the k-fold enlargement gives back the 28x28 image, not a re-framed one."""
    images, _ = synthetic_split(4, seed=5)
    for index, image in enumerate(images.numpy()):
        light = index % 2 == 1  # a dark object on a light background, in colour
        shown = Image.fromarray(255 - image if light else image).convert("RGB" if light else "L")
        picture = shown.resize((28 * factor, 28 * factor), Image.Resampling[resample])
        for frame in (FASHION, None):  # also for a dataset that does not document its framing
            pixels, inverted, conversion = fit_picture(picture, frame, (28, 28))
            assert inverted == light and f"{factor}x" in conversion and "enlargement" in conversion
            # The 8-bit rounding of the enlargement (and of RGB), and bicubic overshoot clipped at 0 and 255.
            difference = np.abs(pixels.astype(int) - image)
            assert difference.mean() < 0.5 and (difference > 2).mean() < 0.02


def test_a_photo_of_a_multiple_size_is_framed_not_reduced() -> None:
    # 56x56, a dark block whose edges fall inside 2x2 cells: detail finer than 2 pixels, so a photo.
    picture = np.full((56, 56), 250, np.uint8)
    picture[9:46, 17:38] = 30
    pixels, inverted, conversion = fit_picture(Image.fromarray(picture), FASHION, (28, 28))
    assert inverted and "trimmed to 21x37" in conversion
    assert pixels[:, 14].min() > 0 and pixels[14].max() > 0  # refitted: the object spans the frame's height


@pytest.mark.e2e
def test_cli_predicts_what_the_model_predicts(model_dir: Path, tmp_path: Path) -> None:
    images, _ = synthetic_split(6, seed=1)
    np.save(tmp_path / "batch.npy", images[:3].numpy())
    np.save(tmp_path / "one.npy", images[3].numpy())  # H x W: a batch of one
    (tmp_path / "t10k-images").write_bytes(idx_bytes(images[4:6]))
    Image.fromarray(images[0].numpy()).save(tmp_path / "zero.png")

    result = predict_cli(tmp_path, "--model", str(model_dir), "--json", "--top-k", "2", ".")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    model, card = load_model(model_dir)
    logits = model(images).softmax(1)
    expected = {"batch.npy[0]": 0, "batch.npy[1]": 1, "batch.npy[2]": 2, "one.npy[0]": 3}
    expected |= {"t10k-images[0]": 4, "t10k-images[1]": 5, "zero.png": 0}
    assert {row["file"]: row["class"] for row in rows} == {
        name: card.classes[logits[i].argmax()] for name, i in expected.items()
    }
    for row in rows:
        probabilities = logits[expected[row["file"]]]
        assert row["probability"] == pytest.approx(probabilities.max().item(), abs=1e-6)
        assert [entry["class"] for entry in row["top_k"]] == [card.classes[i] for i in probabilities.topk(2).indices]


@pytest.mark.e2e
def test_cli_bad_inputs_are_one_line_each_and_the_rest_is_predicted(model_dir: Path, tmp_path: Path) -> None:
    good = np.full((90, 60, 3), 250, np.uint8)
    good[10:80, 15:45] = (200, 20, 20)
    Image.fromarray(good).save(tmp_path / "shirt.jpg")
    jpeg = (tmp_path / "shirt.jpg").read_bytes()
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "float.npy", np.random.default_rng(0).random((2, 28, 28)))
    np.save(tmp_path / "small.npy", np.zeros((2, 20, 20), np.uint8))
    np.save(tmp_path / "none.npy", np.zeros((0, 28, 28), np.uint8))
    (tmp_path / "text.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a picture at all" * 4)
    bad = {
        "corrupt.png": "damaged PNG file",
        "cut.jpg": "damaged JPEG file",
        "notes.txt": "not a PNG, JPEG, BMP, TIFF, PPM/PGM, WebP, .npy (uint8, HxW or NxHxW) or IDX file",
        "empty": "empty folder: no files to predict",
        "float.npy": "got float64 pixels; the model takes uint8 pixels 0-255",
        "small.npy": "got 20x20 images; the model takes 28x28 images",
        "none.npy": "holds no images (an array of shape (0, 28, 28))",
        "text.png": "damaged PNG file (cannot identify image file)",
        "missing.png": "no such file or folder",
    }
    result = predict_cli(tmp_path, "--model", str(model_dir), "shirt.jpg", *bad)
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert len(errors) == len(bad) and "Traceback" not in result.stderr and " at 0x" not in result.stderr
    for line, (name, message) in zip(errors, bad.items(), strict=True):
        assert line.startswith(f"predict: error: {name}: {message}")
    header, row = result.stdout.splitlines()
    assert header.split()[:4] == ["file", "class", "prob", "top"]
    assert row.startswith("shirt.jpg ") and "inverted, 60x90 trimmed to " in row  # JPEG ringing widens 30x70


@pytest.mark.e2e
def test_cli_without_a_model_says_where_to_get_one(tmp_path: Path) -> None:
    Image.new("L", (28, 28)).save(tmp_path / "a.png")
    result = predict_cli(tmp_path, "a.png")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        "predict: error: models: no model here (model.json missing); in the project run `dvc repro` or "
        "`dvc pull`, elsewhere fetch one: dvc artifacts get <repo> classifier --rev <version>\n"
    )


INPUT, CARD_INPUT = "uint8 ['batch', 28, 28]", "the card's pixels: uint8 (batch, 28, 28); rerun the train stage"
OUTPUT, CARD_OUTPUT = "float ['batch', 10]", "the card's logits: float (batch, 9)"


def damage(folder: Path, case: str) -> None:
    """Make the model in `folder` bad in one way."""
    card_file, onnx_file = folder / "model.json", folder / "model.onnx"
    card = json.loads(card_file.read_text())
    if case == "missing":
        onnx_file.unlink()
    elif case == "damaged":
        onnx_file.write_bytes(onnx_file.read_bytes()[:300])
    elif case == "no record":
        del card["onnx"]
    elif case == "other input":
        card["onnx"]["input"] = "pixels"
    elif case == "other classes":
        card["architecture"]["num_classes"], card["classes"] = 9, card["classes"][:9]
    elif case == "newer opset":
        card["onnx"]["opset"] = 99
    card_file.write_text(json.dumps(card))


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("case", "line"),
    [
        ("missing", "model.onnx: missing; rerun the train stage: dvc repro --force train"),
        ("damaged", "model.onnx: not an ONNX model this onnxruntime can load (Failed to load model because protobuf"),
        ("no record", "model.json: names no ONNX file: the model was trained before the train stage wrote model.onnx"),
        ("other input", f"model.onnx: does not match model/model.json: its input is images: {INPUT}, {CARD_INPUT}"),
        (
            "other classes",
            f"model.onnx: does not match model/model.json: its output is logits: {OUTPUT}, {CARD_OUTPUT}",
        ),
        ("newer opset", "model.onnx: needs ONNX opset 99 (the card's), which onnxruntime "),
    ],
)
def test_cli_a_bad_onnx_file_is_one_line(model_dir: Path, tmp_path: Path, case: str, line: str) -> None:
    shutil.copytree(model_dir, tmp_path / "model")
    damage(tmp_path / "model", case)
    Image.new("L", (28, 28)).save(tmp_path / "a.png")
    result = predict_cli(tmp_path, "--model", "model", "a.png")
    assert result.returncode == 1 and result.stdout == ""
    (error,) = result.stderr.splitlines()
    assert error.startswith("predict: error: model/" + line), error


@pytest.mark.e2e
def test_cli_imports_neither_torch_nor_the_model_code(model_dir: Path, tmp_path: Path) -> None:
    """A picture, an array and an IDX file predicted: ONNX Runtime alone computes, no Python of the model's."""
    images, _ = synthetic_split(3, seed=4)
    Image.fromarray(images[0].numpy()).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", images[1:2].numpy())
    (tmp_path / "c-images").write_bytes(idx_bytes(images[2:]))
    script = (
        "import runpy, sys\n"
        "try:\n    runpy.run_module('stages.commands.predict', run_name='__main__', alter_sys=True)\n"
        "finally:\n    print(' '.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    command = [sys.executable, "-c", script, "--model", str(model_dir), "--json", "."]
    env = project_env() | {"PYTHONPATH": str(PROJECT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3
    modules = result.stderr.split()
    assert "onnxruntime" in modules
    assert [name for name in modules if name.partition(".")[0] in ("torch", "torchvision", "safetensors")] == []
    assert not {"stages.core.model", "stages.core.export", "stages.core.user_networks"} & set(modules)


@pytest.fixture(scope="module")
def fashion_logreg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A logreg trained for a few seconds on 5,000 Fashion-MNIST training images."""
    images, labels = (torch.from_numpy(array[:5000].copy()) for array in fashion_mnist("train"))
    mean, std = (images.float() / 255).mean().item(), (images.float() / 255).std().item()
    meta = Meta(dataset="fashion-mnist", classes=CLASSES, image_shape=(28, 28), sizes={"train": 1}, mean=mean, std=std)
    architecture = architecture_for("logreg", (), meta)
    torch.manual_seed(0)
    model = build_model(architecture)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        for batch in torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).split(500):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images[batch]), labels[batch].long()).backward()
            optimizer.step()
    folder = tmp_path_factory.mktemp("fashion-logreg")
    assert (
        save_with_onnx(folder, model, Card(architecture=architecture, classes=CLASSES, dataset="fashion-mnist")) is None
    )
    return folder


@NEEDS_REAL_DATA
@pytest.mark.parametrize("factor", [2, 5, 10])
def test_inverted_enlargements_agree_with_the_original_for_every_common_filter(
    fashion_logreg: Path, factor: int
) -> None:
    """Dark-on-light test images enlarged with nearest, bilinear, bicubic and lanczos: predict's framing gives
    the model's prediction on the 28x28 image for at least 97% of them (bicubic's and lanczos's overshoot is
    clipped at the light background)."""
    from threadpoolctl import threadpool_limits

    model, _ = load_model(fashion_logreg)
    images = fashion_mnist("t10k")[0][:100]
    original = model(torch.from_numpy(images.copy())).argmax(1)
    with threadpool_limits(1):  # the reduction's products are small: BLAS threads would only fight
        for resample in ("NEAREST", "BILINEAR", "BICUBIC", "LANCZOS"):
            framed = np.stack([
                fit_picture(Image.fromarray(255 - image).resize((28 * factor,) * 2, Image.Resampling[resample]),
                            FASHION, (28, 28))[0]
                for image in images
            ])  # fmt: skip
            agree = (model(torch.from_numpy(framed)).argmax(1) == original).float().mean().item()
            assert agree >= 0.97, (resample, factor, agree)


@NEEDS_REAL_DATA
@pytest.mark.e2e
def test_cli_agrees_on_inverted_bicubic_enlargements(fashion_logreg: Path, tmp_path: Path) -> None:
    """Through the command line: test images, dark on light, enlarged 5x bicubic."""
    model, _ = load_model(fashion_logreg)
    images = fashion_mnist("t10k")[0][:100]
    for index, image in enumerate(images):
        Image.fromarray(255 - image).resize((140, 140), Image.Resampling.BICUBIC).save(tmp_path / f"{index:03d}.png")
    result = predict_cli(tmp_path, "--model", str(fashion_logreg), "--json", ".")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    original = model(torch.from_numpy(images.copy())).argmax(1)
    agree = np.mean([row["class"] == CLASSES[original[int(row["file"][:3])]] for row in rows])
    assert len(rows) == 100 and agree >= 0.97, agree
