"""The pure functions of the stages, against independent oracles (scikit-learn, autograd, hand computation)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import PROJECT, dead_pid, sgd_epoch
from threadpoolctl import threadpool_info

from stages.core import artifacts, products
from stages.core.errors import SettingError
from stages.core.metrics import calibration, confusion_matrix, per_class_scores, predict, score
from stages.core.model import Card, architecture_for, build_model, load_model, save_model
from stages.core.runtime import autocast_for, available_cores, resolve_device, resolve_threads, set_cpu_threads
from stages.core.splits import Meta, pixel_statistics, share_of, split_train_val
from stages.core.training import EpochLog, epoch_order, fit, make_optimizer, make_schedule

CLASSES = tuple(str(k) for k in range(10))
META = Meta(dataset="digits", classes=CLASSES, image_shape=(28, 28), sizes={"train": 1}, mean=0.25, std=0.5)


def random_predictions(seed: int = 0, n: int = 500, classes: int = 10):
    generator = torch.Generator().manual_seed(seed)
    actual = torch.randint(0, classes, (n,), generator=generator)
    # Mostly right, sometimes wrong, and class 9 never predicted (a zero denominator).
    predicted = torch.where(
        torch.rand(n, generator=generator) < 0.7, actual, torch.randint(0, 9, (n,), generator=generator)
    )
    return actual, predicted


def test_confusion_and_per_class_scores_match_scikit_learn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    actual, predicted = random_predictions()
    confusion = confusion_matrix(actual, predicted, 10)
    assert confusion.tolist() == metrics.confusion_matrix(actual, predicted, labels=range(10)).tolist()
    scores = per_class_scores(confusion)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        actual, predicted, labels=range(10), zero_division=0
    )
    torch.testing.assert_close(scores["precision"], torch.tensor(precision, dtype=torch.float64))
    torch.testing.assert_close(scores["recall"], torch.tensor(recall, dtype=torch.float64))
    torch.testing.assert_close(scores["f1"], torch.tensor(f1, dtype=torch.float64))
    assert scores["support"].tolist() == support.tolist()
    macro = metrics.f1_score(actual, predicted, average="macro", zero_division=0)
    assert scores["f1"].mean().item() == pytest.approx(macro)


def test_calibration_by_hand() -> None:
    # Four predictions, two bins: confidences 0.3 and 0.4 (bin 1), 0.9 and 0.8 (bin 2).
    probabilities = torch.tensor([[0.3, 0.2, 0.5], [0.4, 0.35, 0.25], [0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    # predicted classes: 2, 0, 0, 1; actual: 2 (right), 1 (wrong), 0 (right), 0 (wrong)
    actual = torch.tensor([2, 1, 0, 0])
    # Bin (0, 0.5]: confidences 0.5, 0.4 -> mean 0.45, accuracy 0.5. Bin (0.5, 1]: 0.9, 0.8 -> 0.85, 0.5.
    rows, ece = calibration(probabilities, actual, bins=2)
    assert rows == [
        {"bin_upper": 0.5, "confidence": 0.45, "accuracy": 0.5, "count": 2},
        {"bin_upper": 1.0, "confidence": 0.85, "accuracy": 0.5, "count": 2},
    ]
    assert ece == pytest.approx(0.5 * 0.05 + 0.5 * 0.35)


def test_the_model_normalises_inside_and_matches_a_hand_written_forward() -> None:
    torch.manual_seed(0)
    model = build_model(architecture_for("logreg", (), META))
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    linear = model.net.layers[0]
    expected = ((images.flatten(1).double() / 255 - 0.25) / 0.5) @ linear.weight.double().T + linear.bias.double()
    torch.testing.assert_close(model(images).double(), expected, rtol=1e-5, atol=1e-5)


def test_the_architecture_model_decides_the_layers() -> None:
    mlp = build_model(architecture_for("mlp", (32, 16), META))
    assert [layer.out_features for layer in mlp.net.layers] == [32, 16, 10]
    logreg = architecture_for("logreg", (32, 16), META)
    assert logreg.hidden == ()
    assert [type(layer) for layer in build_model(logreg).net.layers] == [torch.nn.Linear]
    with pytest.raises(ValueError, match="logreg with hidden widths"):
        logreg.model_validate(logreg.model_dump() | {"hidden": (8,)})


def test_the_training_loops_normalisation_ahead_of_the_step_is_the_forward_passes_to_the_bit() -> None:
    """fit normalises each batch into a buffer on a helper thread; the saved model normalises inside its forward."""
    model = build_model(architecture_for("logreg", (), META))
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    into = model.normalise(images, out=torch.full((6, 1, 28, 28), float("nan")))
    assert torch.equal(into, model.normalise(images)) and into.shape == (6, 1, 28, 28)
    assert torch.equal(into, images[:, None].float() * model.scale + model.shift)


def test_the_pinned_products_are_the_same_bytes_at_any_thread_count() -> None:
    generator = torch.Generator().manual_seed(4)
    inputs, weight = torch.randn(5000, 144, generator=generator), torch.randn(32, 144, generator=generator)
    grad = torch.randn(5000, 32, generator=generator)
    results = []
    for threads in (1, 2, 3, 8):
        set_cpu_threads(threads)
        assert products.threads() == threads
        results.append([
            products.matmul(inputs.numpy(), weight.numpy().T).tobytes(),
            products.matmul_over_rows(grad.numpy(), inputs.numpy()).tobytes(),
            products.sum_over_rows(grad.numpy()).tobytes(),
        ])  # fmt: skip
    set_cpu_threads(1)
    assert all(result == results[0] for result in results)
    # Each task is one OpenBLAS thread: OpenBLAS's own split would change the bytes.
    # numpy's own OpenBLAS, the one the products call (scipy's, where another test loaded it, is not used).
    openblas = [
        info for info in threadpool_info() if info["internal_api"] == "openblas" and "numpy" in info["filepath"]
    ]
    assert openblas and all(info["num_threads"] == 1 for info in openblas), openblas


# A product on two threads under an address-space limit that leaves room for its result but not for an
# OpenBLAS buffer (32 MB) or a thread's stack (8 MB).
AFTER_SET_THREADS = """
import resource
import numpy as np
from stages.core import products
products.set_threads(2)
a, b = np.ones((20000, 144), np.float32), np.ones((144, 32), np.float32)
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 6 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
for _ in range(20):
    assert (products.matmul(a, b) == 144).all()
"""


def test_after_set_threads_a_product_maps_no_memory_but_its_result() -> None:
    """OpenBLAS exits the process when it cannot map a buffer; mapped at start-up, a batch too large for
    the memory fails later where it raises (tests/test_machine_faults.py shows the stage's line)."""
    result = subprocess.run(
        [sys.executable, "-c", AFTER_SET_THREADS],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr


def test_auto_threads_are_the_cores_this_process_may_use() -> None:
    cores = len(os.sched_getaffinity(0))
    assert available_cores() == cores
    assert resolve_threads("auto") == cores and resolve_threads(1) == 1
    assert resolve_threads("auto", processes=2 * cores) == 1  # never none


def test_one_sgd_step_equals_the_closed_form_gradient() -> None:
    """Softmax cross-entropy: dL/dW = (softmax(XW^T + b) - onehot)^T X / B, the oracle for autograd + SGD."""
    torch.manual_seed(1)
    model = build_model(architecture_for("logreg", (), META))
    images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (8,))
    inputs = (images.flatten(1).float() / 255 - 0.25) / 0.5
    weight, bias = model.net.layers[0].weight.detach().clone(), model.net.layers[0].bias.detach().clone()
    residual = (inputs @ weight.T + bias).softmax(1) - F.one_hot(labels, 10).float()
    lr = 0.1
    expected_weight = weight - lr * residual.T @ inputs / 8
    expected_bias = bias - lr * residual.mean(0)

    fit(model, (images, labels), (images, labels), sgd_epoch(lr, batch_size=8))  # one epoch, one batch: one step
    torch.testing.assert_close(model.net.layers[0].weight.detach(), expected_weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.net.layers[0].bias.detach(), expected_bias, rtol=1e-4, atol=1e-5)


def test_train_epoch_reports_the_mean_loss_over_batches_of_unequal_size() -> None:
    torch.manual_seed(2)
    model = build_model(architecture_for("logreg", (), META))
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (10,))
    untrained = F.cross_entropy(model(images), labels).item()
    logs: list[EpochLog] = []
    fit(model, (images, labels), (images, labels), sgd_epoch(0.0001, batch_size=4), report=logs.append)  # 4 + 4 + 2
    # With a tiny lr the weights hardly move, so the mean is close to the loss of the untrained model.
    assert logs[0].metrics["train/loss"] == pytest.approx(untrained, rel=1e-2)


@pytest.mark.parametrize("total", [7, 324, 1100])
def test_cosine_schedule_is_the_closed_form_in_float32(total: int) -> None:
    """The oracle: lr * (1 + cos(pi t / T)) / 2 per step t. torch's recursive CosineAnnealingLR differs from it in
    float64's last bit at most steps, never once rounded to float32, the weights' precision."""
    optimizer = make_optimizer("adam", [torch.nn.Parameter(torch.zeros(1))], lr=0.03, momentum=0.0, weight_decay=0.0)
    schedule = make_schedule("cosine", optimizer, total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    closed_form = [0.03 * (1 + math.cos(math.pi * step / total)) / 2 for step in range(total)]
    assert torch.equal(torch.tensor(rates, dtype=torch.float32), torch.tensor(closed_form, dtype=torch.float32))
    assert make_schedule("constant", optimizer, total) is None


def test_predict_in_batches_equals_one_pass_and_score_by_hand() -> None:
    torch.manual_seed(3)
    model = build_model(architecture_for("mlp", (16,), META))
    images = torch.randint(0, 256, (23, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(predict(model, images, batch_size=5), predict(model, images, batch_size=100))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    scores = score(logits, labels)
    assert scores.accuracy == pytest.approx(2 / 3)
    assert scores.loss == pytest.approx(F.cross_entropy(logits, labels).item())


def test_epoch_order_is_a_seeded_permutation_drawn_on_the_cpu() -> None:
    first = epoch_order(100, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert sorted(first.tolist()) == list(range(100))
    assert torch.equal(first, torch.randperm(100, generator=torch.Generator().manual_seed(5)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_epoch_order_on_cuda_is_the_cpu_order() -> None:
    on_gpu = epoch_order(100, torch.Generator().manual_seed(5), torch.device("cuda"))
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), epoch_order(100, torch.Generator().manual_seed(5), torch.device("cpu")))


def test_split_is_seeded_disjoint_and_complete() -> None:
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1).expand(50, 2, 2).contiguous()
    labels = torch.arange(50) % 10
    splits = split_train_val(images, labels, val_size=10, seed=0)
    again = split_train_val(images, labels, val_size=10, seed=0)
    other = split_train_val(images, labels, val_size=10, seed=1)
    train_ids, val_ids = splits["train"][0][:, 0, 0].tolist(), splits["val"][0][:, 0, 0].tolist()
    assert len(val_ids) == 10 and sorted(train_ids + val_ids) == list(range(50))
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids)  # the file's order is kept
    assert torch.equal(splits["val"][0], again["val"][0]) and not torch.equal(splits["val"][0], other["val"][0])
    assert splits["val"][1].tolist() == [i % 10 for i in val_ids]
    with pytest.raises(SettingError, match=r"^50 is not smaller than the training set \(50 images\); lower it$"):
        split_train_val(images, labels, val_size=50, seed=0)


def test_pixel_statistics_against_numpy() -> None:
    images = torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8)
    mean, std = pixel_statistics(images)
    pixels = images.numpy().astype("float64") / 255
    assert mean == pytest.approx(pixels.mean(), abs=1e-8)
    assert std == pytest.approx(pixels.std(ddof=1), abs=1e-8)


def test_devices_that_are_absent_are_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SettingError, match=r"^cuda is not available \(0 CUDA devices here\); use auto or cpu$"):
        resolve_device("cuda")
    with pytest.raises(SettingError, match=r"^fp16 needs a CUDA device \(this run uses cpu\); use fp32$"):
        autocast_for(torch.device("cpu"), "fp16")


def test_saved_model_round_trips_and_is_the_same_bytes_in_another_process(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = build_model(architecture_for("mlp", (8,), META))
    card = Card(
        architecture=architecture_for("mlp", (8,), META),
        classes=CLASSES,
        dataset="digits",
        device="cpu",
        numerics={"cpu_capability": "AVX2"},
        recipe={"lr": 0.1, "epochs": 1, "tf32": False, "optimizer": "sgd"},
    )
    save_model(tmp_path, model, card)
    loaded, loaded_card = load_model(tmp_path)
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(loaded(images), model.eval()(images))
    assert loaded_card == card

    # The same weights saved by a fresh process give the same bytes (torch.save would not: it embeds a
    # random serialization id), which is what keeps DVC from rerunning everything downstream.
    script = (
        "import sys, torch; from stages.core.model import save_model, load_model; from pathlib import Path; "
        "m, c = load_model(Path(sys.argv[1])); save_model(Path(sys.argv[2]), m, c)"
    )
    (tmp_path / "again").mkdir()
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(tmp_path / "again")],
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    for name in ("model.safetensors", "model.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / name).read_bytes()


def test_report_tables_are_the_bytes_pandas_wrote(tmp_path: Path) -> None:
    """The oracle: pandas' to_csv and to_markdown, which evaluate called before it wrote them without pandas."""
    pd = pytest.importorskip("pandas")
    from stages.core.artifacts import write_csv
    from stages.core.report import markdown_table

    rows = [
        {"class": "T-shirt/top", "precision": 0.81234567, "recall": 1.0, "f1": 0.0, "support": 1000},
        {"class": 'a "quoted", name', "precision": 1e-05, "recall": 0.5, "f1": 0.333333, "support": 7},
    ]
    write_csv(tmp_path / "ours.csv", rows)
    pd.DataFrame(rows).to_csv(tmp_path / "pandas.csv", index=False, lineterminator="\n")
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()
    assert markdown_table(rows) == pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f") + "\n"


@pytest.mark.parametrize("killed_after", ["first rename", "second rename"])
def test_a_switch_killed_between_the_fallbacks_renames_leaves_one_set_and_no_leftover(
    killed_after: str, tmp_path: Path, monkeypatch
) -> None:
    """Where two folders cannot be exchanged in one step, atomic_directory renames three times; a run killed
    between them leaves either the old set aside and the new one in its temporary (put the old one back), or
    the new set in place and the old one aside (stale). The next run must start from one whole set, and
    leave nothing behind."""
    monkeypatch.setattr(artifacts, "_exchange", lambda one, other: False)
    path = tmp_path / "metrics"
    temp = tmp_path / f"{artifacts.TEMP_PREFIX}metrics.{dead_pid()}.abcd1234"
    (temp.with_name(temp.name + ".previous")).mkdir()
    (temp.with_name(temp.name + ".previous") / "test.json").write_text("old")
    target = temp if killed_after == "first rename" else path
    target.mkdir()
    (target / "test.json").write_text("new")

    with artifacts.atomic_directory(path) as folder:
        seen = (path / "test.json").read_text()  # what a reader finds while the next run writes
        (folder / "test.json").write_text("next")
    assert seen == ("old" if killed_after == "first rename" else "new")
    assert (path / "test.json").read_text() == "next"
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["metrics"]


def test_a_killed_runs_unreaped_process_does_not_keep_its_temporary(tmp_path: Path) -> None:
    """A killed stage whose parent died with it is a zombie until init reaps it (in a container without an
    init, never): its pid answers a signal, but it writes nothing more, and the next run removes its file."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    while psutil.Process(ended.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)
    stale = tmp_path / f"{artifacts.TEMP_PREFIX}metrics.json.{ended.pid}.abcd1234"
    live = tmp_path / f"{artifacts.TEMP_PREFIX}metrics.json.{os.getpid()}.abcd1234"
    stale.write_text("killed")
    live.write_text("running")
    artifacts.remove_stale_temporaries(tmp_path, "metrics.json")
    ended.wait()
    assert sorted(path.name for path in tmp_path.iterdir()) == [live.name]


def test_the_default_validation_split_of_a_registered_dataset_is_5000_images() -> None:
    """params.yaml's val_size (a fraction) holds out what the count 5000 did: the same bytes as before."""
    val_size = yaml.safe_load((PROJECT / "params.yaml").read_text())["preprocess"]["val_size"]
    images, labels = torch.arange(60000).view(-1, 1, 1).to(torch.uint8).expand(-1, 2, 2), torch.arange(60000)
    assert share_of(val_size, 60000) == 5000
    by_fraction, by_count = split_train_val(images, labels, val_size, 0), split_train_val(images, labels, 5000, 0)
    assert all(torch.equal(by_fraction[name][1], by_count[name][1]) for name in ("train", "val"))
