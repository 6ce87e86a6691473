"""Stage `evaluate`: score the model on the test split; write the report into `metrics/`.

Everything here is small and tracked by git (`cache: false` in dvc.yaml), so `dvc metrics diff` and
`dvc plots diff` compare commits in a fresh clone without pulling anything. The training log that the
train stage wrote (cached by DVC, for its run-cache) is published here beside the test report.
"""

from __future__ import annotations

from pathlib import Path

from stages.cli import argument_parser, explained, numerics_in_effect, run
from stages.core import files
from stages.core.artifacts import copy_folder, write_csv, write_json, write_png, write_text
from stages.core.model import check_trained_for, load_model
from stages.core.report import build_report, markdown_table, misclassified_grid
from stages.core.runtime import available_cores, make_deterministic, resolve_device, set_cpu_threads
from stages.core.splits import load_split, read_meta
from stages.core.training import predict
from stages.params import Params, check_device, load_section, require


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
    with explained("evaluate.device"):
        device = resolve_device(params.device)
    make_deterministic()
    set_cpu_threads(available_cores())  # the report's bytes do not depend on the count (stages/core/products.py)
    numerics_in_effect()

    model, card = load_model(args.model, device)
    check_trained_for(card, read_meta(args.data), args.model, args.data)
    images, labels = load_split(args.data, "test", device)
    logits = predict(model, images, params.batch_size).cpu()
    images, labels = images.cpu(), labels.cpu()
    report = build_report(logits, labels, card.classes, params.calibration_bins)

    out = args.out
    write_json(out / files.TEST_METRICS, report.summary)
    write_csv(out / files.PER_CLASS, report.per_class)
    write_text(out / files.PER_CLASS_TABLE, markdown_table(report.per_class))
    write_csv(out / files.CONFUSION, report.confusion)
    write_csv(out / files.CALIBRATION, report.calibration)
    grid = misclassified_grid(images, labels, logits, card.classes, params.misclassified_grid)
    write_png(out / files.MISCLASSIFIED, grid)
    copy_folder(args.model / files.TRAINING_LOG, out / files.TRAINING_LOG)


if __name__ == "__main__":
    run(main)
