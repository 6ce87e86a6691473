"""How fast `stages.commands.predict` answers: one picture from a fresh process, and the test set after start-up.

Run by hand, never in CI, from the project root after `dvc repro` (it reads models/ and the test split):

    python -m benchmarks.predict_speed

- cold: `python -m stages.commands.predict picture.png` in a fresh process (interpreter, imports, model, one
  112x112 RGB picture inverted on white, fitted and predicted), wall time, best and median of 5;
- throughput: the 10,000 test images, each a 28x28 PNG in one folder, through `predict_files` in this
  process after the imports and the model load (start-up excluded), and the same folder, and one IDX
  file of them, through the command line ((whole run - cold run) as the cross-check);
- predict's numpy model against the torch Classifier on the 10,000 test images;
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
from pathlib import Path

from PIL import Image
from safetensors.torch import load_file

from benchmarks.results import figure, recorded

MODELS, TEST = Path("models"), Path("data/processed/test.safetensors")
COLD_TARGET_S, THROUGHPUT_TARGET = 2.5, 5000
RUNS = 5


def wall(command: list[str]) -> float:
    return timed(command)[0]


def timed(command: list[str]) -> tuple[float, float]:
    """Wall time and CPU time (user + sys) of a command: on a busy machine the second is what an idle one
    would take, for a process that computes on one core at a time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def import_cost(statement: str) -> float:
    """Median wall time of `import torch; <statement>` minus `import torch`, fresh processes."""
    python = [sys.executable, "-c"]
    base = statistics.median(wall([*python, "import torch"]) for _ in range(3))
    return statistics.median(wall([*python, f"import torch; {statement}"]) for _ in range(3)) - base


def main() -> None:
    import torch

    from stages.commands.predict import predict_files
    from stages.core.files import CARD
    from stages.core.inference import load_classifier
    from stages.core.model import load_model

    if not (MODELS / CARD).exists() or not TEST.exists():
        sys.exit("benchmarks.predict_speed: run `dvc repro` first (needs models/ and data/processed/)")
    images = load_file(str(TEST))["images"]  # (10000, 28, 28) uint8
    n = len(images)
    predict = [sys.executable, "-m", "stages.commands.predict", "--model", str(MODELS), "--json"]
    with tempfile.TemporaryDirectory() as root:
        picture = Path(root) / "picture.png"
        inverted = Image.fromarray(255 - images[0].numpy()).resize((112, 112), Image.Resampling.NEAREST)
        inverted.convert("RGB").save(picture)
        cold, cold_cpu = zip(*(timed([*predict, str(picture)]) for _ in range(RUNS)), strict=True)

        folder = Path(root) / "test-set"
        folder.mkdir()
        for index, image in enumerate(images.numpy()):
            Image.fromarray(image).save(folder / f"{index:05}.png")
        model, card = load_classifier(MODELS)
        passes = []
        for _ in range(3):
            start, cpu = time.perf_counter(), time.process_time()
            rows, failures = predict_files(model, card, [folder], 3, print)
            passes.append((time.perf_counter() - start, time.process_time() - cpu))
            assert len(rows) == n and not failures
        in_process, in_process_cpu = min(passes)
        whole = wall([*predict, str(folder)])
        idx = Path(root) / "t10k-images"
        header = bytes([0, 0, 8, 3]) + b"".join(size.to_bytes(4, "big") for size in images.shape)  # IDX uint8 3-D
        idx.write_bytes(header + images.numpy().tobytes())
        idx_whole = wall([*predict, str(idx)])
        start = time.perf_counter()
        rows, failures = predict_files(model, card, [idx], 3, print)
        idx_in_process = time.perf_counter() - start
        assert len(rows) == n and not failures

    # What predict computes (numpy) against the Classifier (torch), on the whole test set.
    torch_model, _ = load_model(MODELS)
    with torch.no_grad():
        expected = torch_model(images).numpy()
    got = model(images.numpy())
    difference = abs(got - expected).max()
    agree = (got.argmax(1) == expected.argmax(1)).mean()

    best, median = min(cold), statistics.median(cold)
    rate = n / in_process
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
    print(
        f"cold, one 112x112 picture, fresh process ({RUNS} runs): wall best {best:.2f} s, median {median:.2f} s; "
        f"CPU median {statistics.median(cold_cpu):.2f} s"
    )
    print(
        f"10,000 test PNGs after start-up (in process, best of 3): {in_process:.2f} s, {rate:,.0f} images/s "
        f"(CPU {in_process_cpu:.2f} s: {n / in_process_cpu:,.0f} images per CPU-second)"
    )
    print(f"10,000 test PNGs, command line: {whole:.2f} s, {(n - 1) / (whole - median):,.0f} images/s after start-up")
    print(
        f"10,000 test images in one IDX file: command line {idx_whole:.2f} s (its reader, stages/core/idx.py, imports "
        f"torch), after start-up {idx_in_process:.2f} s, {n / idx_in_process:,.0f} images/s"
    )
    print(
        f"numpy logits vs the torch Classifier, 10,000 test images: max |difference| {difference:.1e}, "
        f"same class for {agree:.2%}"
    )
    pil, torchvision = import_cost("from PIL import Image, ImageFilter, ImageOps"), import_cost("import torchvision.io")
    print(f"start-up added to `import torch` by the decoder: PIL {pil:.2f} s, torchvision.io {torchvision:.2f} s")
    with recorded("predict_speed") as figures:
        figures["cold"] = figure(
            "one picture from a fresh process, median seconds",
            round(median, 2),
            f"{median:.2f} s",
            f"<= {COLD_TARGET_S} s",
            f"best {best:.2f} s of {RUNS}",
        )
        figures["throughput"] = figure(
            "the 10,000 test PNGs after start-up, images/s",
            round(rate),
            f"{rate:,.0f}",
            f">= {THROUGHPUT_TARGET:,} images/s",
            f"{in_process:.2f} s",
        )


if __name__ == "__main__":
    main()
