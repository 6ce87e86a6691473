"""Stage `evaluate`: score the model on the test split; write the report into `metrics/`.

Everything here is small and tracked by git (`cache: false` in dvc.yaml), so `dvc metrics diff` and
`dvc plots diff` compare commits in a fresh clone without pulling anything. The training log that the
train stage wrote (cached by DVC, for its run-cache) is published here beside the test report.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from stages.artifacts import atomic_directory, atomic_file, write_json
from stages.cli import StageError, argument_parser, numerics_in_effect, run
from stages.metrics import calibration, confusion_matrix, per_class_scores
from stages.model import CARD, TRAINING_LOG, load_model
from stages.params import Params, check_device, load_section, require
from stages.runtime import make_deterministic, resolve_device, set_cpu_threads
from stages.splits import META, load_split, read_meta
from stages.training import predict, score

CELL_SCALE = 4  # misclassified images are drawn at 4x (28 px -> 112 px) so the labels fit below them
GUTTER = 4  # grey pixels between the cells of the misclassified grid


class EvaluateParams(Params):
    """`evaluate`: how the test set is scored and what the report shows."""

    batch_size: int  # images per forward pass; only memory, never the result, depends on it
    device: str  # auto | cpu | cuda | cuda:N | mps
    calibration_bins: int  # equal-width confidence bins for the calibration curve and the ECE
    misclassified_grid: int  # how many confidently misclassified test images the PNG grid shows

    def check(self) -> None:
        require(self.batch_size >= 1, "evaluate.batch_size", "must be >= 1")
        check_device("evaluate.device", self.device)
        require(self.calibration_bins >= 2, "evaluate.calibration_bins", "must be >= 2")
        require(self.misclassified_grid >= 1, "evaluate.misclassified_grid", "must be >= 1")


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by the preprocess stage")
    parser.add_argument("--model", type=Path, required=True, help="folder written by the train stage")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report (metrics, plots)")
    args = parser.parse_args()
    params = load_section(args.params, "evaluate", EvaluateParams)
    device = resolve_device(params.device, "evaluate.device")
    make_deterministic()
    # One thread, whatever the machine: the report's last digits must not depend on the core count (a
    # matmul's float sums depend on how it is split), and 10,000 test images take milliseconds anyway.
    set_cpu_threads(1)
    numerics_in_effect()
    model, card = load_model(args.model, device)
    meta = read_meta(args.data)
    if tuple(card["classes"]) != meta.classes or tuple(card["architecture"]["image_shape"]) != meta.image_shape:
        raise StageError(
            f"{args.model / CARD}: trained for other data ({len(card['classes'])} classes, images "
            f"{tuple(card['architecture']['image_shape'])}) than {args.data / META} ({len(meta.classes)} classes, "
            f"images {meta.image_shape}); rerun the train stage: dvc repro train"
        )
    images, labels = load_split(args.data, "test", device)
    logits = predict(model, images, params.batch_size).cpu()
    images, labels = images.cpu(), labels.cpu()
    report = build_report(logits, labels, card["classes"], params.calibration_bins)

    out = args.out
    write_json(out / "test.json", report["summary"])
    write_table(out / "per_class.csv", report["per_class"])
    with atomic_file(out / "per_class.md") as temp:
        temp.write_text(markdown_table(report["per_class"]) + "\n", encoding="utf-8")
    write_table(out / "confusion.csv", report["confusion"])
    write_table(out / "calibration.csv", report["calibration"])
    draw_misclassified(out / "misclassified.png", images, labels, logits, card["classes"], params.misclassified_grid)
    with atomic_directory(out / TRAINING_LOG) as folder:
        shutil.copytree(args.model / TRAINING_LOG, folder, dirs_exist_ok=True)


def build_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], bins: int) -> dict[str, Any]:
    """All numbers of the test report, as plain rows ready to be written."""
    scores = score(logits, labels)
    predicted = logits.argmax(1)
    per_class = per_class_scores(confusion_matrix(labels, predicted, len(classes)))
    calibration_rows, ece = calibration(logits.softmax(1), labels, bins)
    summary = {
        "accuracy": round(scores.accuracy, 6),
        "loss": round(scores.loss, 6),
        "macro_f1": round(per_class["f1"].mean().item(), 6),
        "ece": round(ece, 6),
    }
    per_class_rows = [
        {
            "class": name,
            "precision": round(per_class["precision"][i].item(), 4),
            "recall": round(per_class["recall"][i].item(), 4),
            "f1": round(per_class["f1"][i].item(), 4),
            "support": int(per_class["support"][i]),
        }
        for i, name in enumerate(classes)
    ]
    # One row per test image, with class names: what `dvc plots`' confusion template counts.
    pairs = zip(labels.tolist(), predicted.tolist(), strict=True)
    confusion_rows = [{"actual": classes[a], "predicted": classes[p]} for a, p in pairs]
    return {
        "summary": summary,
        "per_class": per_class_rows,
        "confusion": confusion_rows,
        "calibration": calibration_rows,
    }


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    with atomic_file(path) as temp:
        pd.DataFrame(rows).to_csv(temp, index=False, lineterminator="\n")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    import pandas as pd

    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f")


def draw_misclassified(
    path: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    classes: list[str],
    count: int,
) -> None:
    """A PNG grid of the `count` most confidently misclassified test images, labelled true/predicted."""
    from PIL import Image, ImageDraw

    confidence, predicted = logits.softmax(1).max(1)
    wrong = (predicted != labels).nonzero().squeeze(1)
    # Most confident first; ties broken by index (stable sort), so the grid is the same on every run.
    worst = wrong[confidence[wrong].sort(descending=True, stable=True).indices[:count]]
    cells = []
    for index in worst.tolist():
        picture = Image.fromarray(images[index].numpy())
        side = picture.width * CELL_SCALE
        cell = Image.new("L", (side, side + 24), color=255)
        cell.paste(picture.resize((side, side), Image.Resampling.NEAREST))
        draw = ImageDraw.Draw(cell)
        draw.text((2, side + 1), f"true: {classes[labels[index]]}", fill=0)
        draw.text((2, side + 12), f"pred: {classes[predicted[index]]}", fill=0)
        cells.append(cell)
    if not cells:  # a perfect model: an empty white tile keeps the plot declared in dvc.yaml valid
        cells.append(Image.new("L", (28, 28), color=255))
    # The layout of torchvision's make_grid (4 px grey gutters, 6 per row), pasted with PIL: importing
    # torchvision.utils costs the stage about 1.2 s of start-up, the pasting a few lines.
    columns, rows = min(6, len(cells)), -(-len(cells) // 6)
    width, height = cells[0].size
    grid = Image.new("L", (columns * (width + GUTTER) + GUTTER, rows * (height + GUTTER) + GUTTER), color=128)
    for position, cell in enumerate(cells):
        row, column = divmod(position, columns)
        grid.paste(cell, (GUTTER + column * (width + GUTTER), GUTTER + row * (height + GUTTER)))
    with atomic_file(path) as temp:
        grid.save(temp, format="PNG")


if __name__ == "__main__":
    run(main)
