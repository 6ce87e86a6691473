"""How fast `mnist-predict` answers now that it runs model.onnx with ONNX Runtime, side by side with what it ran
before: a numpy copy of the linear models' forward, and torch for the others.

Run by hand, never in CI, from the project root after `dvc repro` (it reads the test split):

    python -m benchmarks.predict_speed

Each model (logreg, mlp and cnn as params.yaml and the README's recipes build them, and the user's network
nets/wide.py:WideNet) is made here with fresh weights, which speed does not depend on, and saved as the
train stage saves it: weights, card and model.onnx.
- cold: `mnist-predict --model DIR picture.png` in a fresh process (interpreter, imports, the model, one
  112x112 RGB picture inverted on white, fitted and predicted), wall and CPU time, best and median of 5;
  beside it, in the same run, `python -c "import torch"`, which the cnn's prediction paid before;
- throughput of the logreg: the 10,000 test images as 28x28 PNGs in one folder through `predict_files`
  after start-up, with the ONNX model and with the numpy forward predict ran before (kept here as the
  baseline), alternated, best of 3 each; the same folder through the command line (whole run - cold run);
  and the 10,000 images as one array, the model's computation alone;
- the logits of ONNX Runtime against the torch model's on the 10,000 test images, for each model;
- the decoder choice: in fresh processes that have imported torch, what `from PIL import Image` and
  `import torchvision.io` add to start-up.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

from benchmarks.results import figure, ratio, recorded

TEST = Path("data/processed/test.safetensors")
META = Path("data/processed")
COLD_TARGET_S = 0.5
RUNS = 5
MODELS = {  # name -> architecture_for's arguments
    "logreg": {"model": "logreg", "hidden": ()},
    "mlp": {"model": "mlp", "hidden": (256,)},
    "cnn": {"model": "cnn", "hidden": (128,), "channels": (16, 32)},
    "user": {"model": "nets/wide.py:WideNet", "hidden": (), "args": {}},
}


def timed_command(command: list[str]) -> tuple[float, float]:
    """Wall time and CPU time (user + sys) of a command: on a busy machine the second is what an idle one
    would take, for a process that computes on one core at a time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def save_models(root: Path) -> dict[str, Path]:
    """Each of MODELS, as the train stage writes it, in a folder of its own under `root`."""
    import torch

    from stages.core.contract import Card
    from stages.core.export import save_with_onnx
    from stages.core.model import architecture_for, build_model
    from stages.core.splits import read_meta

    meta = read_meta(META)
    folders = {}
    for name, arguments in MODELS.items():
        torch.manual_seed(0)
        architecture = architecture_for(meta=meta, **arguments)
        folders[name] = root / name
        card = Card(architecture=architecture, classes=meta.classes, dataset=meta.dataset)
        failed = save_with_onnx(folders[name], build_model(architecture).eval(), card)
        assert failed is None, failed
    return folders


def numpy_logreg(folder: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The forward predict ran for a logreg before model.onnx: the normalisation folded into the product,
    computed by the pinned products in numpy."""
    from stages.core import products
    from stages.core.contract import check_images, read_card
    from stages.core.files import WEIGHTS

    architecture = read_card(folder).architecture
    arrays = load_file(str(folder / WEIGHTS)).values()  # one Linear layer: (classes, pixels) and (classes,)
    weight = next(array for array in arrays if array.ndim == 2)
    bias = next(array for array in arrays if array.shape == weight.shape[:1])
    scale, shift = np.float32(1 / (255 * architecture.std)), np.float32(-architecture.mean / architecture.std)

    def forward(images: np.ndarray) -> np.ndarray:
        check_images(images, architecture.image_shape)
        pixels = images.reshape(len(images), -1).astype(np.float32)
        return products.matmul(pixels, weight.T) * scale + (bias + shift * weight.sum(1))

    return forward


def cold_starts(folders: dict[str, Path], picture: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Wall and CPU seconds of RUNS cold runs each, the commands alternated: each model's, `import torch`'s."""
    predict = str(Path(sys.executable).parent / "mnist-predict")
    commands = {name: [predict, "--model", str(folder), "--json", str(picture)] for name, folder in folders.items()}
    commands["import torch"] = [sys.executable, "-c", "import torch"]
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in commands}
    for _ in range(RUNS):
        for name, command in commands.items():
            wall, cpu = timed_command(command)
            times[name][0].append(wall)
            times[name][1].append(cpu)
    return times


def import_cost(statement: str) -> float:
    """Median wall time of `import torch; <statement>` minus `import torch`, fresh processes."""
    python = [sys.executable, "-c"]
    base = statistics.median(timed_command([*python, "import torch"])[0] for _ in range(3))
    return statistics.median(timed_command([*python, f"import torch; {statement}"])[0] for _ in range(3)) - base


def best_of(count: int, work: Callable[[], object]) -> float:
    """The fastest of `count` runs of `work`, in seconds."""
    spent = []
    for _ in range(count):
        start = time.perf_counter()
        work()
        spent.append(time.perf_counter() - start)
    return min(spent)


def throughput(folder: Path, model_folder: Path, images: np.ndarray) -> tuple[float, float]:
    """The logreg's images per second after start-up: through predict's reading and framing, and alone."""
    from stages.commands.predict import predict_files
    from stages.core.inference import load_classifier

    onnx_model, card = load_classifier(model_folder)
    numpy_model = numpy_logreg(model_folder)
    n = len(images)
    passes: dict[str, list[float]] = {"onnx": [], "numpy": []}
    for _ in range(3):  # alternated: a busy moment of the shared machine falls on both
        for name, model in (("onnx", onnx_model), ("numpy", numpy_model)):
            start = time.perf_counter()
            rows, failures = predict_files(model, card, [folder], 3, print)  # type: ignore[arg-type]
            passes[name].append(time.perf_counter() - start)
            assert len(rows) == n and not failures
    onnx_rate, numpy_rate = n / min(passes["onnx"]), n / min(passes["numpy"])
    print(
        f"logreg, 10,000 test PNGs through predict_files after start-up (best of 3): ONNX Runtime "
        f"{onnx_rate:,.0f} images/s, the numpy forward {numpy_rate:,.0f} images/s: {onnx_rate / numpy_rate:.2f}x"
    )
    onnx_alone, numpy_alone = best_of(5, lambda: onnx_model(images)), best_of(5, lambda: numpy_model(images))
    print(
        f"logreg, the computation alone on 10,000 images (best of 5): ONNX Runtime {n / onnx_alone:,.0f} images/s, "
        f"numpy {n / numpy_alone:,.0f} images/s: {numpy_alone / onnx_alone:.2f}x"
    )
    return onnx_rate, numpy_rate


def agreement(folders: dict[str, Path], images: np.ndarray) -> None:
    """ONNX Runtime's logits against the torch model's, each model, on the test images."""
    import torch

    from stages.core.inference import load_classifier
    from stages.core.model import load_model

    for name, folder in folders.items():
        model, _ = load_model(folder)
        with torch.no_grad():
            expected = model(torch.from_numpy(images)).numpy()
        got = load_classifier(folder)[0](images)
        same = (got.argmax(1) == expected.argmax(1)).mean()
        print(f"{name}: ONNX Runtime's logits vs torch's: max |difference| {abs(got - expected).max():.1e}, "
              f"same class for {same:.2%}")  # fmt: skip


def main() -> None:
    if not TEST.exists():
        sys.exit("benchmarks.predict_speed: run `dvc repro` first (needs data/processed/)")
    images = load_file(str(TEST))["images"]  # (10000, 28, 28) uint8
    with tempfile.TemporaryDirectory() as root:
        folders = save_models(Path(root) / "models")
        picture = Path(root) / "picture.png"
        inverted = Image.fromarray(255 - images[0]).resize((112, 112), Image.Resampling.NEAREST)
        inverted.convert("RGB").save(picture)
        cold = cold_starts(folders, picture)

        pngs = Path(root) / "test-set"
        pngs.mkdir()
        for index, image in enumerate(images):
            Image.fromarray(image).save(pngs / f"{index:05}.png")
        onnx_rate, numpy_rate = throughput(pngs, folders["logreg"], images)
        predict = [str(Path(sys.executable).parent / "mnist-predict"), "--model", str(folders["logreg"]), "--json"]
        whole, _ = timed_command([*predict, str(pngs)])
        cold_logreg = statistics.median(cold["logreg"][0])
        print(f"logreg, 10,000 test PNGs, command line: {whole:.2f} s, "
              f"{(len(images) - 1) / (whole - cold_logreg):,.0f} images/s after start-up")  # fmt: skip
        agreement(folders, images)
    pil, torchvision = import_cost("from PIL import Image, ImageFilter, ImageOps"), import_cost("import torchvision.io")
    print(f"start-up added to `import torch` by the decoder: PIL {pil:.2f} s, torchvision.io {torchvision:.2f} s")

    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
    torch_median = statistics.median(cold["import torch"][0])
    with recorded("predict_speed") as figures:
        for name, (walls, cpus) in cold.items():
            median = statistics.median(walls)
            figures[f"cold {name}"] = figure(
                f"cold `mnist-predict picture.png`, {name} model, median seconds" if name in folders else name,
                round(median, 2),
                f"{median:.2f} s",
                f"<= {COLD_TARGET_S} s" if name in folders else None,
                f"best {min(walls):.2f} s of {RUNS}, CPU median {statistics.median(cpus):.2f} s, "
                f"{median / torch_median:.2f}x `import torch`",
            )
        figures["throughput"] = ratio(
            "logreg, the 10,000 test PNGs through predict after start-up: ONNX Runtime / the numpy forward",
            onnx_rate / numpy_rate,
            2,
            ">= 1x",
            f"{onnx_rate:,.0f} / {numpy_rate:,.0f} images/s",
        )


if __name__ == "__main__":
    main()
