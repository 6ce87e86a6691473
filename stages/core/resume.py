"""Training state saved after each epoch, so that a killed train stage continues instead of starting over.

DVC deletes a stage's outputs before it runs the command, so the state lives outside them (dvc.yaml passes
the folder, under `.dvc/tmp/`, which is per workspace: queued experiments each run in their own).
Each state sits in a subfolder named by a hash of the stage's exact inputs (the train params, the
processed data's bytes, the code of the `stages` modules loaded), so a run never continues another's.
The stage removes its state once the model is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from stages.core.artifacts import atomic_file
from stages.core.training import TrainState

STATE = "state.pt"


def input_key(params: dict[str, Any], data: Path) -> str:
    """A hash of everything the train stage's result depends on: params, data files, the stages' code."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    files = sorted(path for path in data.rglob("*") if path.is_file())
    code = {
        Path(module.__file__)
        for name, module in list(sys.modules.items())
        if (name == "stages" or name.startswith("stages.")) and getattr(module, "__file__", None)
    }
    for path in [*files, *sorted(code)]:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


class Checkpoint:
    """The state of one run (a folder named by its `input_key`), saved after each epoch, gone at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.epoch = 0  # the last epoch saved here

    def next_run(self) -> str:
        """Where the next run of the same inputs starts, in words."""
        return f"the next run continues after epoch {self.epoch}" if self.epoch else "the next run starts at epoch 1"

    def next_run_as_saved(self) -> str:
        """`next_run`, from the state as the training processes saved it (several processes: rank 0 saves it,
        and their launcher, which the interruption reaches first, says it)."""
        self.load()
        return self.next_run()

    def load(self) -> TrainState | None:
        """The state an earlier, interrupted run of the same inputs saved; None if there is none."""
        path = self.folder / STATE
        if not path.is_file():
            return None
        # Our own file, but still loaded without executing pickled code: tensors, numbers, strings and dicts.
        state = TrainState.from_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.epoch = state.epoch
        return state

    def save(self, state: TrainState) -> None:
        """Write `state` to a temporary name and rename it, so a kill mid-write keeps the previous epoch's.

        Serialised in memory first: torch.save writing to a file that fails (a full disk, a file-size limit)
        raises a RuntimeError that names neither the file nor the cause.
        """
        buffer = io.BytesIO()
        torch.save(state.to_dict(), buffer)
        with atomic_file(self.folder / STATE) as temp:
            temp.write_bytes(buffer.getvalue())
        self.epoch = state.epoch

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
