"""The internals of torch and DVC that the stages still reach into, each for a reason its code states:
these fail, naming the reach, when an upgrade moves one, instead of a stage failing or (worse) changing
silently."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from stages.core.distributed import GlobalBatchNorm
from stages.core.runtime import make_deterministic
from stages.launcher import _recorded, record_failure


def test_make_deterministic_turns_on_deterministic_algorithms_without_importing_inductor() -> None:
    """runtime.make_deterministic calls torch._C._set_deterministic_algorithms, as the public
    torch.use_deterministic_algorithms does, without the public one's import of torch._inductor."""
    assert callable(getattr(torch._C, "_set_deterministic_algorithms", None)), "torch moved the C setter"
    code = (
        "import sys, torch\n"
        "from stages.core.runtime import make_deterministic\n"
        "make_deterministic()\n"
        "assert torch.are_deterministic_algorithms_enabled()\n"
        "ours = '_inductor' in sys.modules or 'torch._inductor' in sys.modules\n"
        "torch.use_deterministic_algorithms(True)\n"
        "print(ours, 'torch._inductor' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ours, public = result.stdout.split()
    assert ours == "False", "make_deterministic imported torch._inductor"
    # When the public setter stops importing inductor, use it and drop the private call.
    assert public == "True", "torch.use_deterministic_algorithms no longer imports inductor: use it instead"
    make_deterministic()
    assert torch.are_deterministic_algorithms_enabled()


def test_dvc_still_has_what_restore_outputs_calls() -> None:
    """stages.cli.restore_outputs: Repo.stage.collect(name), then each Output's use_cache, hash_info, exists,
    checkout() (not rwlocked, so it runs while `dvc repro` holds the stage's lock)."""
    from dvc.output import Output
    from dvc.repo.stage import StageLoad

    assert "target" in inspect.signature(StageLoad.collect).parameters
    for name in ("exists", "checkout"):
        assert hasattr(Output, name), f"dvc.output.Output.{name} is gone"
    init = inspect.getsource(Output.__init__)
    for name in ("use_cache", "hash_info"):
        assert f"self.{name} =" in init, f"dvc.output.Output no longer sets {name}"


def test_ddp_has_the_switch_that_turns_off_the_buffer_broadcast() -> None:
    parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    assert "forward_sync_buffers" in parameters or "broadcast_buffers" in parameters


def test_a_recorded_failure_reads_back_through_torchelastic(tmp_path: Path, monkeypatch) -> None:
    """launcher.record_failure writes torchelastic's error-file format; the launcher reads it through
    ProcessFailure, as torch's elastic agent does."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    record_failure("train.lr: training diverged in epoch 1")
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=1, error_file=str(path))
    assert failure.message == "train.lr: training diverged in epoch 1"
    assert _recorded(failure) == "train.lr: training diverged in epoch 1"
    record_failure("RuntimeError: boom", "Traceback ...")
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=1, error_file=str(path))
    assert failure.message["message"] == "RuntimeError: boom"
    assert failure.timestamp == int(json.loads(path.read_text())["message"]["extraInfo"]["timestamp"])
    assert isinstance(_recorded(failure), dict)


def test_global_batch_norm_is_batch_norm_outside_a_process_group() -> None:
    """A public BatchNorm1d subclass: one process, training and evaluation, gives batch norm's own numbers."""
    torch.manual_seed(0)
    ours, reference = GlobalBatchNorm(3), nn.BatchNorm1d(3)
    rows = torch.randn(16, 3)
    torch.testing.assert_close(ours(rows), reference(rows), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, reference.running_var, rtol=0, atol=0)
    ours.eval(), reference.eval()
    torch.testing.assert_close(ours(rows), reference(rows), rtol=0, atol=0)
