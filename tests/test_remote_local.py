"""Sharing through the default remote of .dvc/config, untouched: a folder under `~`, with zero set-up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import dvc, run, stages_restored, stages_run
from team import (
    clone,
    commit_and_push,
    fingerprint,
    is_clean,
    locked_md5,
    make_origin,
    object_key,
    object_md5,
)

pytestmark = pytest.mark.e2e

REMOTE = "local-storage"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory):
    """A home of its own, so that `~` in the default remote's url points into the test, not at the user."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def alice(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teammate who clones, runs the pipeline, commits the results and pushes them: no remote set up."""
    root = tmp_path_factory.mktemp("local-team")
    origin = make_origin(root)
    alice = clone(origin, root / "alice")
    dvc(alice, "repro")
    commit_and_push(alice, "results")
    dvc(alice, "push", "--run-cache")
    return alice


def test_default_remote_is_a_folder_under_home(alice: Path, home: Path) -> None:
    storage = home / "dvc-storage" / "mnist-dvc-pipeline"
    model = object_md5(alice, locked_md5(alice, "train", "models"), "model.safetensors")
    assert (storage / object_key(model)).is_file()
    assert any((storage / "runs").iterdir())  # the run-cache went too
    assert f"Cache and remote '{REMOTE}' are in sync." in dvc(alice, "status", "--cloud").stdout


def test_teammate_pulls_instead_of_recomputing(alice: Path, tmp_path: Path) -> None:
    bob = clone(alice.parent / "origin.git", tmp_path / "bob")
    report = run(bob, sys.executable, "-m", "stages.remote").stdout
    assert f"remote '{REMOTE}'" in report and "reachable" in report

    dvc(bob, "pull")
    assert is_clean(bob)
    assert fingerprint(bob) == fingerprint(alice)
    assert json.loads((bob / "metrics" / "test.json").read_text()) == json.loads(
        (alice / "metrics" / "test.json").read_text()
    )
    again = dvc(bob, "repro")
    assert stages_run(again) == [] and stages_restored(again) == []


def test_corrupted_object_never_reaches_the_workspace(alice: Path, home: Path, tmp_path: Path) -> None:
    model = object_md5(alice, locked_md5(alice, "train", "models"), "model.safetensors")
    stored = home / "dvc-storage" / "mnist-dvc-pipeline" / object_key(model)
    original = stored.read_bytes()
    stored.chmod(0o644)
    try:
        stored.write_bytes(original[:-8] + bytes(8))  # the tail of the weights zeroed: same size, wrong bytes
        bob = clone(alice.parent / "origin.git", tmp_path / "bob")

        # verify = true in .dvc/config: the pull fails loudly instead of checking the bad bytes out.
        pulled = dvc(bob, "pull", check=False)
        assert pulled.returncode != 0
        assert "Checkout failed for following targets:\nmodels" in pulled.stderr
        assert not (bob / "models").exists()
        assert not (bob / ".dvc" / "cache" / object_key(model)).exists()  # not kept in the cache either

        # The same pull without verify: exit 0, `dvc status` clean, and the corrupt weights in the workspace.
        dvc(bob, "remote", "modify", "--local", REMOTE, "verify", "false")
        dvc(bob, "pull")
        weights = "models/model.safetensors"
        assert (bob / weights).read_bytes() != (alice / weights).read_bytes()
        assert is_clean(bob)
    finally:
        stored.write_bytes(original)
