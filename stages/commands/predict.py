"""Predict the class of images with a trained model: PNG or JPEG pictures, .npy arrays, IDX files, folders.

    python -m stages.commands.predict PATH... [--model DIR] [--top-k K] [--json]     (installed: mnist-predict)

Pictures are fitted into the frame the model's dataset made its images with (stages/datasets.yaml), an
integer enlargement of an image of the model's size is reduced back to it (docs/own-images.md), a dark
object on a light background is inverted, and each row says what was done. Arrays are taken as
they are and must already be uint8 images of the model's size. A file or folder that gives no image is
one line on stderr; the others are still predicted, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages import cli
from stages.cli import StageError, run
from stages.core.contract import Card, ImageInputError, check_images
from stages.core.datasets import Frame, load_registry
from stages.core.files import CARD
from stages.core.images import UnreadableInput, list_inputs, read_input
from stages.core.inference import OnnxClassifier, load_classifier, softmax

DEFAULT_MODEL = Path("models")  # dvc.yaml's `models` var, where the train stage writes (a test keeps them equal)


@dataclass(frozen=True)
class Row:
    name: str
    ranked: list[tuple[str, float]]  # the top k classes with their probabilities, most likely first
    inverted: bool
    conversion: str


def main() -> None:
    parser = argparse.ArgumentParser(prog=cli.prog(typed=True), description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="image files, .npy or IDX files, folders of them")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"model folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--top-k", type=int, default=3, help="classes shown per image (default: 3)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image instead of a table")
    args = parser.parse_args()
    if not (args.model / CARD).is_file():
        raise StageError(
            f"{args.model}: no model here ({CARD} missing); in the project run `dvc repro` or `dvc pull`, "
            "elsewhere fetch one: dvc artifacts get <repo> classifier --rev <version>"
        )
    model, card = load_classifier(args.model)  # ONNX Runtime, not torch: start-up (stages/core/inference.py)
    classes = card.classes
    if not 1 <= args.top_k <= len(classes):
        parser.error(f"--top-k: must be between 1 and {len(classes)} (the model's classes)")

    rows, failures = predict_files(model, card, args.paths, args.top_k, lambda line: print(line, file=sys.stderr))
    if args.json:
        for row in rows:
            print(json.dumps(as_json(row)))
    else:
        print(table(rows, args.top_k))
    if failures:
        sys.exit(1)


def predict_files(
    model: OnnxClassifier, card: Card, paths: list[Path], top_k: int, report: Callable[[str], None]
) -> tuple[list[Row], int]:
    """Rows for every image the paths give; `report(line)` for each that gives none. Returns the failures too."""
    image_shape = card.architecture.image_shape
    frame = Frame(**card.frame) if card.frame else frame_for(card.dataset)
    names, batches, notes, failures = [], [], [], 0
    for path, problem in list_inputs(paths):
        try:
            if problem:
                raise UnreadableInput(problem)
            converted = read_input(path, frame, image_shape)
            if converted.array:  # pictures are made uint8 and of the model's size; arrays are as the file says
                check_images(converted.pixels, image_shape)  # the model's own refusal, per file
        except (UnreadableInput, ImageInputError) as error:
            report(f"{cli.prog()}: error: {path}: {error}")
            failures += 1
            continue
        count = len(converted.pixels)
        names += [f"{path}[{i}]" for i in range(count)] if converted.array else [str(path)]
        batches.append(converted.pixels)
        notes += [(converted.inverted, converted.conversion)] * count
    if not batches:
        return [], failures
    images = np.concatenate(batches)  # (N, H, W) uint8
    probabilities = softmax(model(images))
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]  # (N, k), most likely first
    top_probabilities = np.take_along_axis(probabilities, top, axis=1)
    classes = card.classes
    rows = [
        Row(name, [(classes[c], p) for c, p in zip(indices, values, strict=True)], inverted, conversion)
        for name, indices, values, (inverted, conversion) in zip(
            names, top.tolist(), top_probabilities.tolist(), notes, strict=True
        )
    ]
    return rows, failures


def frame_for(dataset: str) -> Frame | None:
    """How `dataset` framed its images, from the registry; None when it is not documented or not known here."""
    spec = load_registry().get(dataset)
    return spec.frame if spec else None


def as_json(row: Row) -> dict:
    (best, probability), *_ = row.ranked
    return {
        "file": row.name,
        "class": best,
        "probability": round(probability, 6),
        "top_k": [{"class": name, "probability": round(p, 6)} for name, p in row.ranked],
        "inverted": row.inverted,
        "conversion": row.conversion,
    }


def table(rows: list[Row], top_k: int) -> str:
    header = ("file", "class", "prob", f"top {top_k}", "conversion")
    cells = [
        (
            row.name,
            row.ranked[0][0],
            f"{row.ranked[0][1]:.3f}",
            ", ".join(f"{n} {p:.2f}" for n, p in row.ranked),
            row.conversion,
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *cells]
    )


def console() -> None:
    """The `mnist-predict` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
