"""The same bytes on every x86-64 CPU with AVX2 and at any thread count: the numerics pin, tried under
other CPUs' kernel choices, and `train.threads` tried at 1, 2, 3 and 8.

A machine's CPU decides which kernels ATen, OpenBLAS, MKL and oneDNN run, through the same environment
variables these tests set from outside: under each variant, as on another CPU, the stages must write the
same bytes. The thread counts run oversubscribed where the machine has fewer cores.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import StageForks, dvc, make_tiny_project, project_env, run_stage, set_params, variant_env

from stages import numerics

X86_AVX2 = numerics.is_x86_64() and numerics.has_avx2()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not X86_AVX2, reason="the pinned numerics are x86-64 AVX2 ones; this CPU computes other bytes by design"
    ),
]
CPU_FLAGS = numerics.CPUINFO.read_text().split() if numerics.CPUINFO.exists() else []
# Each variant makes one library choose its kernels as it would on another CPU: ATen without vector
# kernels (an old CPU) or with AVX-512, MKL dispatching by CPU (AUTO, as it does on AMD) or on Intel's
# branches, oneDNN limited to SSE4.1, OpenBLAS's AVX-512 kernels or its cache size as a machine's
# environment sets them, one OpenBLAS or OpenMP thread. A pinned stage must ignore them all.
VARIANTS = {
    "ATen default": {"ATEN_CPU_CAPABILITY": "default"},
    "MKL AUTO": {"MKL_CBWR": "AUTO"},
    "MKL AVX2": {"MKL_CBWR": "AVX2"},
    "MKL SSE4.2": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "oneDNN SSE4.1": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "OpenBLAS SkylakeX": {"OPENBLAS_CORETYPE": "SkylakeX"},
    "OpenBLAS L2 size": {"OPENBLAS_CORETYPE": "Zen", "OPENBLAS_L2_SIZE": "1048576"},
    "OpenBLAS one thread": {"OPENBLAS_NUM_THREADS": "1"},
    "OpenMP one thread": {"OMP_NUM_THREADS": "1"},
    "all at once": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_CBWR": "AUTO",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "OPENBLAS_CORETYPE": "Sandybridge",
        "OMP_NUM_THREADS": "1",
    },
}
if "avx512f" in CPU_FLAGS:
    VARIANTS["ATen AVX-512"] = {"ATEN_CPU_CAPABILITY": "avx512"}
    VARIANTS["MKL AVX-512"] = {"MKL_CBWR": "AVX512"}


def train(stages: StageForks, project: Path, name: str) -> dict[str, bytes]:
    """`python -m stages.train` through `stages`; the bytes of the model folder it wrote."""
    models = f"models-{name}"
    stages.run(project, "python", "-m", "stages.train", "--data", "data/processed", "--out", models)
    return files_in(project / models)


def train_and_evaluate(stages: StageForks, project: Path, name: str, variant: dict[str, str]) -> dict[str, bytes]:
    """Train, then evaluate, through `stages` started under `variant`; the bytes of everything they wrote. Each
    stage reports the variant's pinned variables as overridden: the variant reached it."""
    models, report = f"models-{name}", f"metrics-{name}"
    written = train(stages, project, name)
    evaluated = stages.run(
        project, "python", "-m", "stages.evaluate", "--data", "data/processed", "--model", models, "--out", report
    )
    for variable in variant.keys() & numerics.PINNED.keys():
        assert f"{variable}={variant[variable]} from the environment ignored" in evaluated.stderr, evaluated.stderr
    return written | files_in(project / report)


def under(variant: dict[str, str], project: Path) -> StageForks:
    """The stages in processes started with `variant` as their only numerics variables, as on another CPU: each
    run a fork of one Python that imported them under it (the libraries read the variables as they load), so
    that a variant's train and evaluate pay one interpreter's start and one import of torch, not two."""
    return StageForks(project, variant_env(variant))


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# A network of the user's, in plain torch.nn, with what the pin covers beyond the built-in models: a 5x5
# convolution of stride 2, a grouped and dilated one, dropout and batch norm.
OWN_NETWORK = """
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, in_channels, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 5, stride=2, padding=2)  # 28 -> 14
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=2, dilation=2, groups=2, bias=False)
        self.norm = nn.BatchNorm2d(2 * width)
        self.dropout = nn.Dropout(0.25)
        self.head = nn.Linear(2 * width * 7 * 7, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.norm(self.conv2(x))), 2)  # (B, 2 width, 7, 7)
        return self.head(self.dropout(x.flatten(1)))
"""


@pytest.fixture(scope="module")
def tiny_preprocessed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project's data, preprocessed once for the module, with a network of the user's in nets/: each
    test writes its own output folders."""
    project = make_tiny_project(tmp_path_factory.mktemp("numerics"))
    (project / "nets" / "pinned.py").write_text(OWN_NETWORK)
    dvc(project, "repro", "preprocess")
    return project


@pytest.fixture(scope="module")
def as_here(tiny_preprocessed: Path) -> Iterator[StageForks]:
    """The stages with no numerics variable set, for the module's reference runs."""
    with under({}, tiny_preprocessed) as stages:
        yield stages


@pytest.fixture
def preprocessed(tiny_preprocessed: Path) -> Iterator[Path]:
    """The module's project with an mlp in params.yaml, put back after the test (which may change it)."""
    # An mlp: two matmuls and a ReLU per step give the kernels more to disagree on than a logreg.
    params_file = tiny_preprocessed / "params.yaml"
    committed = params_file.read_text()
    params = yaml.safe_load(committed)
    params["train"].update(model="mlp", hidden=[64], epochs=3)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    yield tiny_preprocessed
    params_file.write_text(committed)


def test_every_cpu_variant_writes_the_same_bytes(preprocessed: Path, as_here: StageForks) -> None:
    reference = train_and_evaluate(as_here, preprocessed, "reference", {})  # no variable set
    card = json.loads(reference["model.json"])
    assert card["numerics"] == {
        "cpu_capability": "AVX2",
        "onednn_max_cpu_isa": "AVX2",
        "openblas_coretype": "Haswell",
    }
    for name, variant in VARIANTS.items():
        with under(variant, preprocessed) as stages:
            written = train_and_evaluate(stages, preprocessed, name.replace(" ", "-"), variant)
        differing = sorted(path for path in reference if written.get(path) != reference[path])
        assert not differing, f"under {name} ({variant}) these differ from the reference: {differing}"


@pytest.mark.parametrize(
    ("model", "train_params"),
    [
        ("cnn", {"model": "cnn", "channels": [4, 8], "hidden": [16], "epochs": 2}),
        ("own", {"model": "nets/pinned.py:Net", "epochs": 2}),
    ],
)
def test_convolutions_write_the_same_bytes_under_every_cpu_variant(
    preprocessed: Path, as_here: StageForks, model: str, train_params: dict
) -> None:
    """A cnn adds batch norm, max-pooling and convolutions; a network of the user's strided, grouped and
    dilated convolutions and dropout: the same check."""
    params = yaml.safe_load((preprocessed / "params.yaml").read_text())
    params["train"].update(train_params)
    (preprocessed / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    reference = train_and_evaluate(as_here, preprocessed, f"{model}-reference", {})
    for name in ("oneDNN SSE4.1", "ATen default", "OpenBLAS SkylakeX", "MKL AUTO", "all at once"):
        with under(VARIANTS[name], preprocessed) as stages:
            written = train_and_evaluate(stages, preprocessed, f"{model}-" + name.replace(" ", "-"), VARIANTS[name])
        differing = sorted(path for path in reference if written.get(path) != reference[path])
        assert not differing, f"under {name} ({VARIANTS[name]}) these differ from the reference: {differing}"


@pytest.mark.parametrize("model", ["mlp", "nets/pinned.py:Net"])
def test_the_variants_do_change_the_bytes_without_the_pin(preprocessed: Path, model: str) -> None:
    """Without the pin, the same variants give other weights: the tests above could fail, and would."""
    set_params(preprocessed, **{"train.model": model})
    weights = {
        name: unpinned_weights(preprocessed, f"unpinned-{index}", variant)
        for index, (name, variant) in enumerate(
            [
                ("no variables", {}),
                ("ATen default", VARIANTS["ATen default"]),
                ("OpenBLAS Sandybridge", {"OPENBLAS_CORETYPE": "Sandybridge"}),
            ]
        )
    }
    assert len(set(weights.values())) == len(weights), "these variants gave the same bytes even unpinned"


def unpinned_weights(project: Path, name: str, variant: dict[str, str]) -> bytes:
    """Train in a process whose torch loaded before the pin could apply, under `variant`; the weights' bytes."""
    models = f"models-{name}"
    run_stage(project, "stages.train", "--data", "data/processed", "--out", models, variant=variant, pinned=False)
    return (project / models / "model.safetensors").read_bytes()


# Large enough that every product is cut into several tasks (stages/core/products.py), and that a
# library's own split of the work would depend on the thread count: the tiny project has 500 training images.
THREAD_COUNTS = (1, 2, 3, 8)
MODELS = {
    "logreg": {"model": "logreg", "batch_size": 500, "epochs": 2},
    "mlp": {"model": "mlp", "hidden": [256], "batch_size": 500, "epochs": 2},
    "cnn": {"model": "cnn", "channels": [16, 32], "hidden": [32], "batch_size": 100, "epochs": 1},
    "own": {"model": "nets/pinned.py:Net", "batch_size": 100, "epochs": 1},
}


@pytest.mark.parametrize("model", MODELS)
def test_the_thread_count_does_not_change_the_bytes(preprocessed: Path, as_here: StageForks, model: str) -> None:
    set_params(preprocessed, **{f"train.{key}": value for key, value in MODELS[model].items()})
    written = {}
    for threads in THREAD_COUNTS:
        set_params(preprocessed, **{"train.threads": threads})
        written[threads] = train(as_here, preprocessed, f"{model}-{threads}-threads")
    for threads in THREAD_COUNTS[1:]:
        differing = sorted(path for path in written[1] if written[threads].get(path) != written[1][path])
        assert not differing, f"{model} at {threads} threads: these differ from 1 thread's: {differing}"


def test_a_user_setting_is_overridden_with_one_warning(preprocessed: Path) -> None:
    env = project_env() | {"OPENBLAS_CORETYPE": "SkylakeX"}
    result = subprocess.run(
        [sys.executable, "-m", "stages.train", "--data", "data/processed", "--out", "models-warned"],
        cwd=preprocessed,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "train: warning: OPENBLAS_CORETYPE=SkylakeX from the environment ignored: every stage runs with "
        "OPENBLAS_CORETYPE=Haswell, so that any x86-64 CPU computes the same bytes (README, Reproducibility)"
    ]


def test_outputs_are_readable_by_the_whole_team(tiny_preprocessed: Path) -> None:
    """Every output gets a new file's ordinary mode: a shared or served model folder is readable by all."""
    dvc(tiny_preprocessed, "repro")  # train and evaluate; the module's fixture ran the data stages
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    for folder in ("data", "models", "metrics"):
        for path in (tiny_preprocessed / folder).rglob("*"):
            if path.is_file():
                assert stat.S_IMODE(path.stat().st_mode) == expected, f"{path}: mode {path.stat().st_mode:o}"
