"""The cnn, the best epoch and early stopping, and resuming from the state saved after each epoch.

Oracles: torch's functional ops for the cnn's forward pass, an uninterrupted run for a resumed one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import synthetic_split
from pydantic import ValidationError

from stages.cli import StageError
from stages.core.contract import PREDICT_BATCH, Architecture
from stages.core.curves import write_curves
from stages.core.metrics import predict
from stages.core.model import (
    MAPS_PREDICT_BATCH,
    Card,
    architecture_for,
    build_model,
    init_model,
    load_model,
    save_model,
)
from stages.core.resume import STATE, Checkpoint, input_key
from stages.core.runtime import make_deterministic
from stages.core.splits import Meta
from stages.core.training import BestEpoch, EpochLog, TrainState, fit
from stages.params import parse_section
from stages.train import TrainParams

CLASSES = tuple(str(k) for k in range(10))
META = Meta(dataset="digits", classes=CLASSES, image_shape=(28, 28), sizes={"train": 1}, mean=0.25, std=0.5)
PARAMS = {
    "model": "cnn",
    "hidden": [16],
    "channels": [4, 8],
    "optimizer": "adam",
    "lr": 0.01,
    "lr_schedule": "cosine",
    "momentum": 0.9,
    "weight_decay": 0.0,
    "batch_size": 50,
    "epochs": 4,
    "early_stopping": 0,
    "stop_after": 0,
    "seed": 0,
    "threads": 1,
    "processes": 1,
    "device": "cpu",
    "precision": "fp32",
    "tf32": False,
}


def train_params(**changes: object) -> TrainParams:
    return parse_section("train", PARAMS | changes, TrainParams)


class Log:
    """Stands in for the stage's report: keeps each epoch's metrics, and whether it was trained or replayed."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.trained: list[int] = []

    def __call__(self, log: EpochLog) -> None:
        self.rows.append(log.metrics)
        if log.seconds is not None:
            self.trained.append(log.epoch)


def data(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = synthetic_split(count, seed)
    return images, labels.long()


def test_cnn_normalises_inside_and_matches_a_functional_forward() -> None:
    torch.manual_seed(0)
    architecture = architecture_for("cnn", (16,), META, (4, 8))
    model = build_model(architecture).eval()
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    x = ((images.double() / 255 - 0.25) / 0.5).unsqueeze(1)  # (5, 1, 28, 28)
    for conv, norm in zip(model.net.convs, model.net.norms, strict=True):
        x = F.max_pool2d(F.conv2d(x, conv.weight.double(), padding=1), 2)  # 28 -> 14 -> 7
        x = (x - norm.running_mean.double()[:, None, None]) / (norm.running_var.double()[:, None, None] + 1e-5).sqrt()
        x = F.relu(x * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None])
    first, second = model.net.head.layers
    hidden = F.relu(x.flatten(1) @ first.weight.double().T + first.bias.double())  # (5, 8 * 7 * 7) -> (5, 16)
    expected = hidden @ second.weight.double().T + second.bias.double()
    torch.testing.assert_close(model(images).double(), expected, rtol=1e-5, atol=1e-5)


def test_the_cnn_predicts_in_passes_of_its_own_size() -> None:
    """A cnn's activations per image are many times a linear model's: `predict` (validation in `fit`, the
    benchmarks' test passes) runs it on MAPS_PREDICT_BATCH images at a time, which bounds its peak memory."""
    model = build_model(architecture_for("cnn", (16,), META, (4, 8)))
    passes: list[int] = []
    model.register_forward_pre_hook(lambda module, inputs: passes.append(len(inputs[0])))
    predict(model, torch.randint(0, 256, (MAPS_PREDICT_BATCH + 5, 28, 28), dtype=torch.uint8))
    assert passes == [MAPS_PREDICT_BATCH, 5]
    assert build_model(architecture_for("mlp", (16,), META)).predict_batch == PREDICT_BATCH > MAPS_PREDICT_BATCH


def test_cnn_round_trips_through_its_files(tmp_path: Path) -> None:
    torch.manual_seed(1)
    architecture = architecture_for("cnn", (16,), META, (4, 8))
    model = build_model(architecture)
    images, labels = data(100, 0)
    F.cross_entropy(model(images), labels).backward()  # batch norm's running statistics move off their start
    save_model(tmp_path, model, Card(architecture=architecture, classes=CLASSES, dataset="digits"))
    loaded, card = load_model(tmp_path)
    assert card.architecture == architecture
    assert '"channels"' in (tmp_path / "model.json").read_text()
    torch.testing.assert_close(loaded(images), model.eval()(images))


def test_channels_belong_to_the_cnn_alone(tmp_path: Path) -> None:
    assert architecture_for("logreg", (), META, (4, 8)).channels is None
    assert architecture_for("mlp", (8,), META, (4, 8)).channels is None
    # A linear model's card has no "channels" key: its bytes are what they were before the cnn.
    mlp = architecture_for("mlp", (8,), META)
    save_model(tmp_path, build_model(mlp), Card(architecture=mlp, classes=CLASSES, dataset="digits"))
    assert '"channels"' not in (tmp_path / "model.json").read_text()
    fields = {"model": "cnn", "hidden": (), "image_shape": (28, 28), "num_classes": 2, "mean": 0.1, "std": 0.3}
    with pytest.raises(ValidationError, match="the cnn needs them"):
        Architecture(**fields)
    with pytest.raises(StageError, match=r"^train.channels: the cnn needs at least one width$"):
        train_params(channels=[])


def test_best_epoch_keeps_the_lowest_validation_loss_and_counts_patience() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    best = BestEpoch(patience=2)
    for epoch, loss in enumerate([0.9, 0.5, 0.6, 0.5, 0.7], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        stop = best.update(epoch, loss, model)
        assert stop == (epoch >= 4)  # epochs 3 and 4 not lower than epoch 2 (a tie is no improvement)
    assert best.epoch == 2 and best.weights["weight"].item() == 2
    never = BestEpoch(patience=0)
    assert not any(never.update(epoch, 1.0 + epoch, model) for epoch in range(1, 20))


def run_epochs(params: TrainParams, log: Log, state: Path | None = None, kill_at: int | None = None):
    """fit as the stage calls it, on a fresh model; returns the model and how it stopped.
    `kill_at`: raise as a kill would while epoch `kill_at` is being saved (its state never lands)."""
    device = torch.device(params.device)
    architecture = architecture_for(params.model, params.hidden, META, params.channels)
    model = init_model(architecture, params.seed, device)
    checkpoint = Checkpoint(state) if state else None

    def save(saved: TrainState) -> None:
        if saved.epoch == kill_at:
            raise KeyboardInterrupt("killed")
        checkpoint.save(saved)

    resume = checkpoint.load() if checkpoint else None
    train_set, val_set = (tuple(t.to(device) for t in data(count, seed)) for count, seed in ((300, 0), (100, 1)))
    save = save if checkpoint else None
    stopped = fit(model, train_set, val_set, params.fit_config(), resume=resume, report=log, save=save)
    return model, stopped


def test_training_keeps_the_best_epoch_and_stops_early() -> None:
    # A learning rate far too high: validation loss climbs after the first epochs.
    params = train_params(model="mlp", hidden=[32], lr=3.0, lr_schedule="constant", epochs=8, early_stopping=2)
    model, stopped = run_epochs(params, Log())
    assert stopped.epoch == stopped.best_epoch + 2 < 8
    assert stopped.reason == "validation loss not lower for 2 epochs (early stopping)"

    full, stopped_full = run_epochs(params.model_copy(update={"early_stopping": 0}), Log())
    assert stopped_full.epoch == 8 and stopped_full.best_epoch == stopped.best_epoch
    assert stopped_full.reason == "all 8 epochs done"
    # Both keep the best epoch's weights, which the early stop reached first: the same model.
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[name]), name


def test_a_run_cut_short_trains_the_first_epochs_of_the_whole_run() -> None:
    """train.stop_after, which a search sets on a pruned trial: the schedule still spans train.epochs."""
    params = train_params(epochs=4)
    whole_log, cut_log = Log(), Log()
    run_epochs(params, whole_log)
    _, stopped = run_epochs(params.model_copy(update={"stop_after": 2}), cut_log)
    assert cut_log.trained == [1, 2] and cut_log.rows == whole_log.rows[:2]
    assert (stopped.epoch, stopped.reason) == (2, "stopped after epoch 2 of 4, as asked (a pruned search trial)")
    with pytest.raises(StageError, match=r"^train\.stop_after: must be 0 \(all epochs\) to 4 \(train\.epochs\)$"):
        train_params(epochs=4, stop_after=5)


def test_a_killed_fit_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    params = train_params(epochs=4)
    whole_log = Log()
    whole, _ = run_epochs(params, whole_log, tmp_path / "whole")
    assert not list((tmp_path / "whole").glob(".*.tmp"))

    state = tmp_path / "killed"
    killed_log = Log()
    with pytest.raises(KeyboardInterrupt):
        run_epochs(params, killed_log, state, kill_at=3)
    assert (state / STATE).is_file() and killed_log.trained == [1, 2]  # epochs 1 and 2 were saved
    resumed_log = Log()
    resumed, _ = run_epochs(params, resumed_log, state)
    assert resumed_log.trained == [3, 4]  # only those are trained again
    assert resumed_log.rows == whole_log.rows  # the curves of the killed epochs are logged again
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_the_state_key_is_the_exact_inputs(tmp_path: Path) -> None:
    (tmp_path / "train.safetensors").write_bytes(b"one")
    key = input_key(PARAMS, tmp_path)
    assert key == input_key(dict(PARAMS), tmp_path)
    assert key != input_key(PARAMS | {"lr": 0.02}, tmp_path)
    (tmp_path / "train.safetensors").write_bytes(b"two")
    assert key != input_key(PARAMS, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_cnn_on_cuda_trains_what_the_cpu_trains(precision: str) -> None:
    """The device changes where the cnn is computed, not what: the same initial weights and batches give
    the CPU's logits in fp32 (float rounding apart) and its predictions in bf16 (an 8-bit mantissa moves
    logits by more than a tenth after three epochs: measured on an H200); two CUDA runs give the same bytes."""
    make_deterministic()
    params = train_params(epochs=3, early_stopping=0)
    on_cpu, _ = run_epochs(params, Log())
    on_cuda, _ = run_epochs(params.model_copy(update={"device": "cuda", "precision": precision}), Log())
    again, _ = run_epochs(params.model_copy(update={"device": "cuda", "precision": precision}), Log())
    for name, tensor in on_cuda.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    images = data(100, 2)[0]
    with torch.no_grad():
        cpu_logits = on_cpu.eval()(images)
        cuda_logits = on_cuda.eval()(images.cuda()).float().cpu()
    difference = (cuda_logits - cpu_logits).abs().max().item() / cpu_logits.abs().max().item()
    agreement = (cuda_logits.argmax(1) == cpu_logits.argmax(1)).float().mean().item()
    print(f"cnn {precision}: largest logit difference CUDA - CPU {difference:.2e} of the largest logit, {agreement=}")
    assert agreement >= 0.95
    if precision == "fp32":
        assert difference < 1e-3


def test_the_curves_are_the_bytes_dvclive_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle: DVCLive's Live, as the train stage called it before it wrote the files itself."""
    from dvclive import Live

    monkeypatch.chdir(tmp_path)  # outside any repository: DVCLive only writes its files
    history = [
        {"train/loss": 1.572439, "train/accuracy": 0.7456, "val/loss": 0.68, "val/accuracy": 0.8162},
        {"train/loss": 0.541536, "train/accuracy": 0.835811, "val/loss": 0.492712, "val/accuracy": 0.8406},
        {"train/loss": 0.5, "train/accuracy": 1.0, "val/loss": 2e-07, "val/accuracy": 0.0},
    ]
    with Live(str(tmp_path / "dvclive"), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        for metrics in history:
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()
        live.summary["device"] = "cpu"
    for epochs in range(1, len(history) + 1):  # rewritten after each epoch, as the stage does
        write_curves(tmp_path / "ours", history[:epochs])
    write_curves(tmp_path / "ours", history, {"device": "cpu"})
    theirs = {
        path.relative_to(tmp_path / "dvclive"): path.read_bytes()
        for path in (tmp_path / "dvclive").rglob("*")
        if path.is_file()
    }
    ours = {
        path.relative_to(tmp_path / "ours"): path.read_bytes()
        for path in (tmp_path / "ours").rglob("*")
        if path.is_file()
    }
    assert ours == theirs
