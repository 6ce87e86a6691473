"""Sharing results through a DVC remote, each teammate in a fresh clone: one scenario over the default remote
of .dvc/config (a folder under `~`) and an S3 bucket on a real server (SeaweedFS's `weed`); then what only
S3 can do to a push: a server killed midway, a wrong key. The remotes and the origin are conftest.py's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import dvc, run, set_params, stages_restored, stages_run
from s3server import READER_ACCESS_KEY, READER_SECRET_KEY, TrippingRelay, WeedServer
from team import (
    CODE_TAG,
    S3,
    LocalRemote,
    S3Remote,
    assert_clean,
    cache_fingerprint,
    commit_and_push,
    fingerprint,
    locked_md5,
    object_key,
    object_md5,
    teammate,
    teammate_editing_at_checkout,
)

pytestmark = pytest.mark.e2e

S3_ONLY = pytest.mark.parametrize("remote", [S3], indirect=True)


@pytest.fixture(scope="module")
def alice(remote: LocalRemote | S3Remote, origin: Path) -> Path:
    """A teammate who runs the pipeline, commits the results, pushes data, models and run-cache."""
    alice = teammate(remote, origin, origin.parent / "alice")
    dvc(alice, "repro")
    commit_and_push(alice, "results")
    dvc(alice, "push", "--run-cache")
    return alice


def test_push_sends_the_outputs_and_the_run_cache(remote: LocalRemote | S3Remote, alice: Path) -> None:
    model = object_md5(alice, locked_md5(alice, "train", "models"), "model.safetensors")
    assert remote.read(object_key(model)) == (alice / "models" / "model.safetensors").read_bytes()
    assert remote.listing("runs")  # the run-cache went too
    assert f"Cache and remote '{remote.name}' are in sync." in dvc(alice, "status", "--cloud").stdout


def test_teammate_pulls_instead_of_recomputing(
    remote: LocalRemote | S3Remote, alice: Path, origin: Path, tmp_path: Path
) -> None:
    bob = teammate(remote, origin, tmp_path / "bob")
    report = run(bob, sys.executable, "-m", "stages.commands.remote").stdout
    assert f"remote '{remote.name}'" in report and "reachable" in report

    dvc(bob, "pull")
    assert_clean(bob)
    assert fingerprint(bob) == fingerprint(alice)
    assert json.loads((bob / "metrics" / "test.json").read_text()) == json.loads(
        (alice / "metrics" / "test.json").read_text()
    )
    again = dvc(bob, "repro")
    assert stages_run(again) == [] and stages_restored(again) == []


def test_repro_pull_restores_train_from_the_run_cache(
    remote: LocalRemote | S3Remote, alice: Path, origin: Path, tmp_path: Path
) -> None:
    # B checks out the code without A's dvc.lock: only the run-cache knows what A computed.
    bob = teammate(remote, origin, tmp_path / "bob")
    run(bob, "git", "checkout", "-q", CODE_TAG)
    assert not (bob / "dvc.lock").exists()

    reproduced = dvc(bob, "repro", "--pull")
    assert "train" in stages_restored(reproduced)
    assert "train" not in stages_run(reproduced)
    assert locked_md5(bob, "train", "models") == locked_md5(alice, "train", "models")
    assert fingerprint(bob, ("models",)) == fingerprint(alice, ("models",))


def test_new_params_reach_teammate(remote: LocalRemote | S3Remote, alice: Path, origin: Path, tmp_path: Path) -> None:
    # A again, in a fresh clone, changing lr 0.03 to 0.01 before anything else. DVC's autostage (off in
    # .dvc/config) rewrote git's index during the repro, after which git no longer saw that edit: the commit
    # held the new dvc.lock and the old params.yaml.
    carol = teammate_editing_at_checkout(remote, origin, tmp_path / "carol", **{"train.lr": 0.01})
    dvc(carol, "pull")
    assert stages_run(dvc(carol, "repro")) == ["train", "evaluate"]
    commit_and_push(carol, "train with lr 0.01", branch="lr-0.01")
    dvc(carol, "push")
    assert locked_md5(carol, "train", "models") != locked_md5(alice, "train", "models")

    bob = teammate(remote, origin, tmp_path / "bob", branch="lr-0.01")
    dvc(bob, "pull")
    assert_clean(bob)
    assert locked_md5(bob, "train", "models") == locked_md5(carol, "train", "models")
    assert fingerprint(bob) == fingerprint(carol)


def test_corrupted_object_never_reaches_the_workspace(
    remote: LocalRemote | S3Remote, alice: Path, origin: Path, tmp_path: Path
) -> None:
    model = object_key(object_md5(alice, locked_md5(alice, "train", "models"), "model.safetensors"))
    original = remote.read(model)
    try:
        remote.write(model, original[:-8] + bytes(8))  # the tail of the weights zeroed: same size, wrong bytes
        bob = teammate(remote, origin, tmp_path / "bob")

        # verify = true in .dvc/config: the pull fails loudly instead of checking the bad bytes out.
        pulled = dvc(bob, "pull", check=False)
        assert pulled.returncode != 0
        assert "Checkout failed for following targets:\nmodels" in pulled.stderr
        assert not (bob / "models").exists()
        assert not (bob / ".dvc" / "cache" / model).exists()  # not kept in the cache either
        assert fingerprint(bob, ("data",)) == fingerprint(alice, ("data",))  # the intact outputs did arrive

        # The same pull without verify: exit 0, `dvc status` clean, and the corrupt weights in the workspace.
        dvc(bob, "remote", "modify", "--local", remote.name, "verify", "false")
        dvc(bob, "pull")
        weights = "models/model.safetensors"
        assert (bob / weights).read_bytes() != (alice / weights).read_bytes()
        assert_clean(bob)
    finally:
        remote.write(model, original)


@S3_ONLY
def test_server_stopped_mid_push(
    remote: S3Remote, alice: Path, origin: Path, weed: WeedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = teammate(remote, origin, tmp_path / "a")
    dvc(a, "pull")
    # An empty bucket, reached through a relay that kills the server once 300 kB of the ~1.3 MB have gone up.
    weed.filesystem().mkdir("mid-push")
    relay = TrippingRelay(weed.ports["s3"], trip_bytes=300_000, on_trip=weed.stop)
    dvc(a, "remote", "modify", "--local", remote.name, "url", f"s3://mid-push/{remote.prefix}")
    dvc(a, "remote", "modify", "--local", remote.name, "endpointurl", f"http://127.0.0.1:{relay.port}")
    workspace, cache = fingerprint(a), cache_fingerprint(a)
    try:
        with monkeypatch.context() as patch:
            patch.setenv("AWS_MAX_ATTEMPTS", "1")  # give up in seconds, not after botocore's minute of retries
            failed = dvc(a, "push", check=False)
        assert relay.tripped.wait(timeout=30)
        assert failed.returncode != 0
        assert "failed to transfer" in failed.stderr or "unexpected error" in failed.stderr
        assert (fingerprint(a), cache_fingerprint(a)) == (workspace, cache)

        weed.start()
        assert "files pushed" in dvc(a, "push").stdout
        assert f"Cache and remote '{remote.name}' are in sync." in dvc(a, "status", "--cloud").stdout
        assert (fingerprint(a), cache_fingerprint(a)) == (workspace, cache)

        # What the server kept from the killed push is whole: a fresh clone pulls it (verify is on) intact.
        bob = teammate(remote, origin, tmp_path / "bob")
        dvc(bob, "remote", "modify", "--local", remote.name, "url", f"s3://mid-push/{remote.prefix}")
        dvc(bob, "pull")
        assert fingerprint(bob) == workspace
    finally:
        relay.close()
        if weed.process is None:
            weed.start()


@S3_ONLY
def test_wrong_secret_key_is_refused_and_named(remote: S3Remote, alice: Path, origin: Path, tmp_path: Path) -> None:
    bob = teammate(remote, origin, tmp_path / "bob")
    dvc(bob, "pull")
    workspace, cache = fingerprint(bob), cache_fingerprint(bob)
    remote.set_credentials(bob, secret="not-the-secret")

    pushed = dvc(bob, "push", check=False)
    assert pushed.returncode != 0 and "403" in pushed.stderr  # DVC's own words; they do not name the remote
    assert (fingerprint(bob), cache_fingerprint(bob)) == (workspace, cache)

    newcomer = teammate(remote, origin, tmp_path / "newcomer")
    remote.set_credentials(newcomer, secret="not-the-secret")
    pulled = dvc(newcomer, "pull", check=False)
    assert pulled.returncode != 0
    assert not any((newcomer / folder).exists() for folder in ("data", "models"))  # nothing half-pulled

    checked = run(bob, sys.executable, "-m", "stages.commands.remote", check=False)
    assert checked.returncode == 1
    assert f"remote '{remote.name}' ({remote.url}) refused this clone's credentials" in checked.stderr
    assert f"dvc remote modify --local {remote.name}" in checked.stderr
    assert "Traceback" not in checked.stderr and len(checked.stderr.strip().splitlines()) == 1


@S3_ONLY
def test_read_only_keys_are_refused_by_the_check_and_leave_nothing(
    remote: S3Remote, alice: Path, origin: Path, tmp_path: Path
) -> None:
    bob = teammate(remote, origin, tmp_path / "bob")
    remote.set_credentials(bob, access_key=READER_ACCESS_KEY, secret=READER_SECRET_KEY)
    dvc(bob, "pull")  # reading works
    before = remote.everything()

    set_params(bob, **{"train.lr": 0.05})
    dvc(bob, "repro")
    assert dvc(bob, "push", check=False).returncode != 0  # the keys truly cannot push

    checked = run(bob, sys.executable, "-m", "stages.commands.remote", check=False)
    assert checked.returncode == 1
    assert f"remote '{remote.name}' ({remote.url}) can be read but refuses writes" in checked.stderr
    assert "Traceback" not in checked.stderr and len(checked.stderr.strip().splitlines()) == 1
    assert remote.everything() == before  # no probe left behind


@S3_ONLY
def test_check_with_write_access_leaves_nothing(remote: S3Remote, alice: Path, origin: Path, tmp_path: Path) -> None:
    bob = teammate(remote, origin, tmp_path / "bob")
    before = remote.everything()
    assert "reachable" in run(bob, sys.executable, "-m", "stages.commands.remote").stdout
    assert remote.everything() == before


@S3_ONLY
def test_released_model_is_fetched_by_version_through_s3(
    remote: LocalRemote | S3Remote, alice: Path, origin: Path, tmp_path: Path
) -> None:
    # README, "Use the model elsewhere": A registers the committed model with GTO; someone outside the project
    # fetches that version by name, the S3 remote committed in the project serving the files, a reader's keys
    # on the command line. (tests/test_use_elsewhere.py does the same through the default remote, and predicts.)
    run(alice, "gto", "register", "classifier", "--version", "v1.0.0")
    run(alice, "git", "push", "-q", "origin", "classifier@v1.0.0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    keys = [f"access_key_id={READER_ACCESS_KEY}", f"secret_access_key={READER_SECRET_KEY}"]
    dvc(elsewhere, "artifacts", "get", str(origin), "classifier", "--rev", "v1.0.0", "--remote-config", *keys)
    assert fingerprint(elsewhere, ("models",)) == fingerprint(alice, ("models",))
