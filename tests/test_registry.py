"""The registry entry in dvc.yaml tells the truth about the committed run; predict's defaults follow dvc.yaml."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parent.parent
DVC_YAML = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((PROJECT / "params.yaml").read_text())
ARTIFACT = DVC_YAML["artifacts"]["classifier"]
FIX = "update artifacts.classifier.meta in dvc.yaml after committing a new run"


def test_meta_agrees_with_the_params_and_metrics_of_the_committed_run() -> None:
    meta = ARTIFACT["meta"]
    assert meta["dataset"] == PARAMS["data"]["dataset"], FIX
    assert meta["architecture"] == PARAMS["train"]["model"], FIX
    accuracy = json.loads((PROJECT / "metrics" / "test.json").read_text())["accuracy"]
    assert meta["test_accuracy"] == accuracy, f"metrics/test.json says {accuracy}; {FIX}"
    assert {meta["dataset"], meta["architecture"]} <= set(ARTIFACT["labels"]), FIX


def test_meta_agrees_with_the_model_card_when_the_model_is_here() -> None:
    card_file = PROJECT / "models" / "model.json"
    if not card_file.exists():
        pytest.skip("models/ is DVC's, not git's: here only after `dvc repro` or `dvc pull`")
    card = json.loads(card_file.read_text())
    meta = ARTIFACT["meta"]
    assert (card["dataset"], card["architecture"]["model"]) == (meta["dataset"], meta["architecture"]), FIX
    assert card["architecture"]["image_shape"] == meta["image_shape"], FIX


def test_artifact_is_the_train_stage_output() -> None:
    assert ARTIFACT["type"] == "model"
    assert DVC_YAML["stages"]["train"]["outs"] == [ARTIFACT["path"]]


def test_predict_default_model_is_where_train_writes() -> None:
    from stages.commands.predict import DEFAULT_MODEL

    (models,) = DVC_YAML["stages"]["train"]["outs"]
    assert DEFAULT_MODEL == Path(models)


def test_console_scripts_point_at_functions() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the project also supports 3.10
    scripts = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"mnist-predict", "mnist-report"} <= set(scripts)
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
