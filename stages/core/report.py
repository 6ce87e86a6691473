"""The test report: its numbers, as typed rows ready to be written, and the grid of misclassified images."""

from __future__ import annotations

import dataclasses
from typing import TypedDict

import torch

from stages.core.metrics import CalibrationRow, calibration, confusion_matrix, per_class_scores, score

CELL_SCALE = 4  # misclassified images are drawn at 4x (28 px -> 112 px) so the labels fit below them
GUTTER = 4  # grey pixels between the cells of the misclassified grid


class Summary(TypedDict):
    accuracy: float
    loss: float  # mean cross-entropy
    macro_f1: float
    ece: float  # expected calibration error


# "class" is a keyword, hence the functional form; the keys are the columns of per_class.csv.
ClassRow = TypedDict("ClassRow", {"class": str, "precision": float, "recall": float, "f1": float, "support": int})


class ConfusionRow(TypedDict):
    """One test image: what `dvc plots`' confusion template counts."""

    actual: str
    predicted: str


@dataclasses.dataclass(frozen=True)
class Report:
    summary: Summary
    per_class: list[ClassRow]
    confusion: list[ConfusionRow]
    calibration: list[CalibrationRow]


def build_report(logits: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], bins: int) -> Report:
    """All numbers of the test report, from the logits (N, classes) of the test images and their labels (N,)."""
    scores = score(logits, labels)
    predicted = logits.argmax(1)
    per_class = per_class_scores(confusion_matrix(labels, predicted, len(classes)))
    calibration_rows, ece = calibration(logits.softmax(1), labels, bins)
    summary = Summary(
        accuracy=round(scores.accuracy, 6),
        loss=round(scores.loss, 6),
        macro_f1=round(per_class["f1"].mean().item(), 6),
        ece=round(ece, 6),
    )
    per_class_rows = [
        ClassRow(
            {
                "class": name,
                "precision": round(per_class["precision"][i].item(), 4),
                "recall": round(per_class["recall"][i].item(), 4),
                "f1": round(per_class["f1"][i].item(), 4),
                "support": int(per_class["support"][i]),
            }
        )
        for i, name in enumerate(classes)
    ]
    pairs = zip(labels.tolist(), predicted.tolist(), strict=True)
    confusion_rows = [ConfusionRow(actual=classes[a], predicted=classes[p]) for a, p in pairs]
    return Report(summary, per_class_rows, confusion_rows, calibration_rows)


def markdown_table(rows: list[ClassRow]) -> str:
    from tabulate import tabulate  # what pandas' to_markdown calls, without pandas' second of import

    return tabulate(rows, headers="keys", tablefmt="pipe", floatfmt=".4f") + "\n"


def misclassified_grid(
    images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, classes: tuple[str, ...], count: int
):
    """A PIL image: the `count` most confidently misclassified images, labelled true/predicted."""
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
    return grid
