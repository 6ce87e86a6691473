"""Stage `preprocess`: decode the IDX files into train/val/test tensors in `data/processed/`.

Images stay uint8 (N, H, W) and labels int64 (N,), saved with safetensors: loading runs no pickled code,
and the same input gives the same bytes in every process (torch.save embeds a random id, which would
make DVC rerun everything downstream). The normalisation statistics, computed on the training split
only, are stored beside the tensors in `meta.json`.
"""

from __future__ import annotations

from pathlib import Path

from stages.cli import argument_parser, explained, run
from stages.core.artifacts import atomic_directory
from stages.core.datasets import read_manifest
from stages.core.idx import read_raw
from stages.core.splits import describe, hold_out, save_split, split_train_val, write_meta
from stages.params import Params, check_share, load_section


class PreprocessParams(Params):
    """`preprocess`: how the training set is split into train and validation. A size is a count of images
    (an int) or a fraction of the images it is taken from (a float in (0, 1), rounded up, as scikit-learn's
    `test_size`)."""

    val_size: int | float  # held out of the training set for validation
    test_size: int | float  # held out of all images as the test split, only when the dataset has none
    seed: int

    def check(self) -> None:
        check_share("preprocess.val_size", self.val_size)
        check_share("preprocess.test_size", self.test_size)


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="folder written by the download stage")
    parser.add_argument("--out", type=Path, required=True, help="folder for the split tensors")
    args = parser.parse_args()
    params = load_section(args.params, "preprocess", PreprocessParams)

    manifest = read_manifest(args.raw)
    raw = read_raw(args.raw, manifest)  # "train", and "test" unless a folder of pictures had no test/
    if "test" not in raw:
        with explained("preprocess.test_size"):
            raw["train"], raw["test"] = hold_out(*raw["train"], params.test_size, params.seed)
    with explained("preprocess.val_size"):
        splits = split_train_val(*raw["train"], params.val_size, params.seed)
    splits["test"] = raw["test"]
    meta = describe(manifest.dataset, manifest.classes, splits, manifest.frame)
    with atomic_directory(args.out) as folder:
        for name, (images, labels) in splits.items():
            save_split(folder, name, images, labels)
        write_meta(folder, meta)


if __name__ == "__main__":
    run(main)
