"""The training curves and their summary, in DVCLive's layout and bytes, written without DVCLive.

DVCLive's `Live` opens the DVC repository and imports pandas when it starts (about a second of the train
stage on 2 cores: docs/speed.md), to write five small files. These are its files, byte for byte
(tests/test_training.py writes the same metrics through DVCLive and compares): `dvc plots` and
`dvc metrics` read them as DVCLive's.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.core.artifacts import write_text

SUMMARY = "metrics.json"  # the last epoch's metrics, nested by their `/` parts, and the last step
PLOTS = Path("plots") / "metrics"  # one <name>.tsv per metric: a `step` column (from 0), then the values


def write_curves(folder: Path, history: list[dict[str, float]], summary: dict[str, str] | None = None) -> None:
    """Each epoch's metrics of `history` (by name, such as `train/loss`) as curves in `folder`, and the
    last epoch's as its summary, with the `summary` entries after them."""
    for name in history[-1]:
        rows = "".join(f"{step}\t{metrics[name]}\n" for step, metrics in enumerate(history))
        write_text(folder / PLOTS / f"{name}.tsv", f"step\t{name.rpartition('/')[2]}\n{rows}")
    nested: dict = {}
    for name, value in history[-1].items():
        *groups, key = name.split("/")
        branch = nested
        for group in groups:
            branch = branch.setdefault(group, {})
        branch[key] = value
    document = nested | {"step": len(history) - 1} | (summary or {})
    write_text(folder / SUMMARY, json.dumps(document, indent=4) + "\n")


def read_curve(folder: Path, name: str) -> list[float]:
    """The values of curve `name` (such as `val/loss`) that `write_curves` left in `folder`, one per epoch;
    [] while there is none. Read while training writes it: each file is replaced whole (write_text)."""
    try:
        lines = (folder / PLOTS / f"{name}.tsv").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [float(line.split("\t")[1]) for line in lines[1:]]
