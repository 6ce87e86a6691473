"""The download stage against mirrors that fail in every way the issue lists, through `python -m stages.download`
and `dvc repro download`: the exact lines a user sees, and what is (not) left in data/raw."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import TINY, dvc, project_env, run, set_params, stages_run
from http_mirror import (
    HttpMirror,
    altered,
    redirect,
    reset_midway,
    serve,
    serve_altered,
    serve_bytes,
    slow,
    stall_midway,
    status,
    truncate_midway,
)

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
NAMES = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS]
RAW_FILES = sorted(["dataset.json", *(name.removesuffix(".gz") for name in NAMES)])
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.e2e  # every test runs the stage; those with an HTTP mirror are marked server too


@pytest.fixture
def mirror_folder(tiny_project: Path, tmp_path: Path) -> Path:
    """The folder holding the tiny dataset's .gz files (tiny_project made it and registered it)."""
    return tmp_path / "mirror"


@pytest.fixture
def http(mirror_folder: Path) -> Iterator[HttpMirror]:
    server = HttpMirror(mirror_folder)
    yield server
    server.close()


def configure(project: Path, *mirrors: str, registry: list[str] | None = None, **data: object) -> None:
    """Set data.mirrors (and other data.* keys); `registry` replaces the tiny dataset's own mirrors."""
    set_params(project, **{"data.mirrors": list(mirrors), "data.timeout_s": 5, "data.retries": 0})
    set_params(project, **{f"data.{key}": value for key, value in data.items()})
    if registry is not None:
        registry_file = project / "stages" / "datasets.yaml"
        entries = yaml.safe_load(registry_file.read_text())
        entries[TINY]["mirrors"] = registry
        registry_file.write_text(yaml.safe_dump(entries, sort_keys=False))


def download(project: Path) -> subprocess.CompletedProcess:
    return run(project, "python", "-m", "stages.download", "--out", "data/raw", check=False, timeout=120)


def served_from(result: subprocess.CompletedProcess) -> dict[str, str]:
    """Which mirror gave each file, from the one line per file printed when stderr is not a terminal."""
    lines = re.findall(r"^download: (\S+): [\d,]+ bytes from (\S+) in [\d.]+s \([\d.]+ MB/s\), ", result.stderr, re.M)
    return dict(lines)


def warnings(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("download: warning: ")]


def assert_complete(project: Path, mirror_folder: Path) -> None:
    """data/raw holds exactly the decompressed files and the manifest, byte for byte, no temporaries."""
    raw = project / "data" / "raw"
    assert sorted(path.name for path in raw.iterdir()) == RAW_FILES
    for name in NAMES:
        assert (raw / name.removesuffix(".gz")).read_bytes() == gzip.decompress((mirror_folder / name).read_bytes())


def assert_nothing_usable(project: Path, mirror_folder: Path) -> None:
    """No manifest, and nothing partial under a final name: a later stage cannot take a bad file for good."""
    raw = project / "data" / "raw"
    left = [path for path in raw.iterdir() if not path.name.startswith(".tmp-")] if raw.exists() else []
    assert "dataset.json" not in [path.name for path in left]
    for path in left:  # files verified before the failure or kill, complete
        assert path.read_bytes() == gzip.decompress((mirror_folder / f"{path.name}.gz").read_bytes())


@pytest.mark.server
def test_404_warns_and_takes_the_next_mirror(tiny_project: Path, mirror_folder: Path, http: HttpMirror) -> None:
    http.script(TRAIN_IMAGES, status(404))
    configure(tiny_project, http.url)
    result = download(tiny_project)
    assert result.returncode == 0, result.stderr
    assert warnings(result) == [
        f"download: warning: {TRAIN_IMAGES} from {http.url}: HTTP 404 Not Found; trying the next mirror"
    ]
    registry_mirror = f"{mirror_folder}/"
    assert served_from(result) == {
        TRAIN_IMAGES: registry_mirror,
        TRAIN_LABELS: http.url,
        TEST_IMAGES: http.url,
        TEST_LABELS: http.url,
    }
    assert_complete(tiny_project, mirror_folder)


@pytest.mark.server
def test_transient_errors_are_retried_on_the_same_mirror(
    tiny_project: Path, mirror_folder: Path, http: HttpMirror
) -> None:
    http.script(TRAIN_IMAGES, status(500), serve)
    http.script(TRAIN_LABELS, reset_midway(), serve)
    http.script(TEST_IMAGES, stall_midway(), serve)
    configure(tiny_project, http.url, registry=[], retries=1, timeout_s=0.5)
    result = download(tiny_project)
    assert result.returncode == 0, result.stderr
    assert warnings(result) == [
        f"download: warning: {TRAIN_IMAGES} from {http.url}: HTTP 500 Internal Server Error; retry 1 of 1 in 0.5s",
        f"download: warning: {TRAIN_LABELS} from {http.url}: connection broken (ConnectionResetError); "
        "retry 1 of 1 in 0.5s",
        f"download: warning: {TEST_IMAGES} from {http.url}: timed out after 0.5s; retry 1 of 1 in 0.5s",
    ]
    assert set(served_from(result).values()) == {http.url}
    assert [http.requests.count(f"/{name}") for name in NAMES] == [2, 2, 2, 1]
    assert_complete(tiny_project, mirror_folder)


@pytest.mark.server
def test_short_body_stall_and_reset_fall_through_to_the_next_mirror(
    tiny_project: Path, mirror_folder: Path, http: HttpMirror
) -> None:
    size = (mirror_folder / TRAIN_IMAGES).stat().st_size
    http.script(TRAIN_IMAGES, truncate_midway())
    http.script(TRAIN_LABELS, reset_midway())
    http.script(TEST_IMAGES, stall_midway())
    configure(tiny_project, http.url, retries=0, timeout_s=0.5)
    result = download(tiny_project)
    assert result.returncode == 0, result.stderr
    assert warnings(result) == [
        f"download: warning: {TRAIN_IMAGES} from {http.url}: body ended after {size // 2:,} of {size:,} bytes; "
        "trying the next mirror",
        f"download: warning: {TRAIN_LABELS} from {http.url}: connection broken (ConnectionResetError); "
        "trying the next mirror",
        f"download: warning: {TEST_IMAGES} from {http.url}: timed out after 0.5s; trying the next mirror",
    ]
    assert served_from(result)[TEST_LABELS] == http.url
    assert_complete(tiny_project, mirror_folder)


@pytest.mark.server
def test_redirects_are_followed_to_http_only(tiny_project: Path, mirror_folder: Path, http: HttpMirror) -> None:
    http.script(TRAIN_IMAGES, redirect(f"/moved/{TRAIN_IMAGES}"))
    http.script(f"moved/{TRAIN_IMAGES}", serve)
    http.script(TEST_LABELS, redirect(f"ftp://127.0.0.1/{TEST_LABELS}"))
    configure(tiny_project, http.url)
    result = download(tiny_project)
    assert result.returncode == 0, result.stderr
    assert http.requests[:2] == [f"/{TRAIN_IMAGES}", f"/moved/{TRAIN_IMAGES}"]
    assert served_from(result)[TRAIN_IMAGES] == http.url
    assert warnings(result) == [
        f"download: warning: {TEST_LABELS} from {http.url}: redirected to unsupported scheme 'ftp:' "
        f"(ftp://127.0.0.1/{TEST_LABELS}); trying the next mirror"
    ]
    assert_complete(tiny_project, mirror_folder)


@pytest.mark.server
def test_wrong_bytes_on_the_first_mirror_good_on_the_second_through_dvc_repro(
    tiny_project: Path, mirror_folder: Path, http: HttpMirror
) -> None:
    http.script(TRAIN_IMAGES, serve_altered)
    http.script(TEST_LABELS, serve_bytes(b"<html>captive portal</html>"))
    configure(tiny_project, http.url)
    result = dvc(tiny_project, "repro", "download")
    body = altered((mirror_folder / TRAIN_IMAGES).read_bytes())
    wrong_md5 = hashlib.md5(body).hexdigest()[:12]
    wrong_sha = hashlib.sha256(gzip.decompress(body)).hexdigest()[:12]
    assert warnings(result) == [
        f"download: warning: {TRAIN_IMAGES} from {http.url}: checksum mismatch (.gz md5 {wrong_md5}..., "
        f"payload sha256 {wrong_sha}...; neither is the one in stages/datasets.yaml); trying the next mirror",
        f"download: warning: {TEST_LABELS} from {http.url}: not a valid gzip file "
        "(Not a gzipped file (b'<h')); trying the next mirror",
    ]
    assert served_from(result) == {
        TRAIN_IMAGES: f"{mirror_folder}/",
        TRAIN_LABELS: http.url,
        TEST_IMAGES: http.url,
        TEST_LABELS: f"{mirror_folder}/",
    }
    assert_complete(tiny_project, mirror_folder)
    assert "data/raw" in (tiny_project / "dvc.lock").read_text()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.server
def test_every_mirror_bad_lists_every_attempt(
    tiny_project: Path, mirror_folder: Path, http: HttpMirror, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / TRAIN_IMAGES).write_bytes(gzip.compress(b"not the dataset", mtime=0))
    http.script(f"flaky/{TRAIN_IMAGES}", status(503))
    refused = f"http://127.0.0.1:{closed_port()}/"
    mirrors = [f"{http.url}/missing/", f"{http.url}/flaky/", refused, str(tmp_path / "nowhere"), f"file://{bad}/"]
    configure(tiny_project, *mirrors, registry=[], retries=1)
    result = download(tiny_project)
    assert result.returncode == 1
    md5 = hashlib.md5((bad / TRAIN_IMAGES).read_bytes()).hexdigest()[:12]
    sha = hashlib.sha256(b"not the dataset").hexdigest()[:12]
    reasons = [
        "HTTP 404 Not Found",
        "HTTP 503 Service Unavailable (after 2 attempts)",
        "unreachable ([Errno 111] Connection refused)",
        "no such file",
        f"checksum mismatch (.gz md5 {md5}..., payload sha256 {sha}...; neither is the one in stages/datasets.yaml)",
    ]
    # A warning as each mirror fails (and before the retry), then one error listing every attempt.
    assert warnings(result) == [
        f"download: warning: {TRAIN_IMAGES} from {mirrors[0]}: {reasons[0]}; trying the next mirror",
        f"download: warning: {TRAIN_IMAGES} from {mirrors[1]}: HTTP 503 Service Unavailable; retry 1 of 1 in 0.5s",
        *(
            f"download: warning: {TRAIN_IMAGES} from {m}: {r}; trying the next mirror"
            for m, r in zip(mirrors[1:4], reasons[1:4], strict=True)
        ),
    ]
    tried = "; ".join(f"{mirror}: {reason}" for mirror, reason in zip(mirrors, reasons, strict=True))
    assert result.stderr.splitlines()[-1] == (
        f"download: error: could not get {TRAIN_IMAGES} from any mirror ({tried}); "
        "add a reachable mirror to data.mirrors in params.yaml"
    )
    assert_nothing_usable(tiny_project, mirror_folder)
    assert not (tiny_project / "data" / "raw" / "dataset.json").exists()


@pytest.mark.parametrize("form", ["file-url", "directory"])
def test_local_mirrors(tiny_project: Path, mirror_folder: Path, form: str) -> None:
    mirror = f"file://{mirror_folder}" if form == "file-url" else str(mirror_folder)
    configure(tiny_project, mirror, registry=[])
    result = download(tiny_project)
    assert result.returncode == 0, result.stderr
    # Not a terminal: one line per file (name, size, mirror, rate, which checksum matched), no bar.
    assert served_from(result) == dict.fromkeys(NAMES, mirror)
    assert len(result.stderr.splitlines()) == 4
    assert all(line.endswith(", .gz md5 verified") for line in result.stderr.splitlines())
    assert_complete(tiny_project, mirror_folder)
    manifest = yaml.safe_load((tiny_project / "data" / "raw" / "dataset.json").read_text())
    assert manifest["dataset"] == TINY and manifest["files"]["train_images"] == "train-images-idx3-ubyte"


def test_progress_bar_on_a_terminal(tiny_project: Path, mirror_folder: Path) -> None:
    configure(tiny_project, str(mirror_folder), registry=[])
    leader, follower = pty.openpty()
    # A new pty is 0x0; tqdm sizes its bar to the terminal, so give it the size of a real one.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(
        ["python", "-m", "stages.download", "--out", "data/raw"],
        cwd=tiny_project,
        env=project_env(),
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal is gone once the stage exits
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(timeout=60) == 0
    text = output.decode()
    for name in NAMES:
        assert f"{name}: 100%|" in text  # one bar per file, run to completion
    labels_size = (mirror_folder / TRAIN_LABELS).stat().st_size  # small enough to be shown unscaled
    assert f"| {labels_size}/{labels_size} [" in text  # bytes done of the total announced
    assert "B/s]" in text  # the rate
    assert "bytes from" not in text  # the bar replaces the one-line summaries


@pytest.mark.parametrize(
    ("mirror", "message"),
    [
        (
            "ftp://example.com/mnist/",
            "data.mirrors[0]: 'ftp://example.com/mnist/' has unsupported scheme 'ftp:'; "
            "use https://, http://, file:// or a local directory",
        ),
        (
            "file://datasets/mnist/",
            "data.mirrors[0]: 'file://datasets/mnist/' names a host; a file:// URL needs an absolute path, "
            "e.g. file:///srv/datasets/mnist/",
        ),
        ("", "data.mirrors[0]: is empty; give an https://, http://, file:// URL or a local directory"),
    ],
)
def test_unusable_mirror_is_refused_before_anything_is_fetched(tiny_project: Path, mirror: str, message: str) -> None:
    configure(tiny_project, mirror)
    result = download(tiny_project)
    assert result.returncode == 1
    assert result.stderr == f"download: error: {message}\n"
    assert not (tiny_project / "data").exists()


@pytest.mark.parametrize(
    ("command", "over_a_complete_raw"),
    [(["dvc", "repro", "download"], False), (["python", "-m", "stages.download", "--out", "data/raw"], True)],
    ids=["dvc-repro", "stage-over-a-complete-raw"],
)
@pytest.mark.server
def test_sigkill_mid_download_then_a_clean_rerun(
    tiny_project: Path, mirror_folder: Path, http: HttpMirror, command: list[str], over_a_complete_raw: bool
) -> None:
    configure(tiny_project, http.url, registry=[])
    raw = tiny_project / "data" / "raw"
    if over_a_complete_raw:
        assert download(tiny_project).returncode == 0
    # The third file trickles in, so the kill lands after two files are in place and before the manifest.
    http.script(TEST_IMAGES, slow(bytes_per_second=50_000))
    # Its own session, so that killing the group kills dvc and the stage it runs, as a lost machine would.
    process = subprocess.Popen(
        command,
        cwd=tiny_project,
        env=project_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(path.stat().st_size > 8192 for path in raw.glob(f".tmp-{TEST_IMAGES}.*")):
            assert process.poll() is None and time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    assert_nothing_usable(tiny_project, mirror_folder)
    assert list(raw.glob(".tmp-*")), "the kill came too late to test anything"
    preprocess = run(
        tiny_project, "python", "-m", "stages.preprocess", "--raw", "data/raw", "--out", "data/processed", check=False
    )
    assert preprocess.returncode == 1
    assert preprocess.stderr == (
        "preprocess: error: data/raw/dataset.json: missing; run the download stage first (dvc repro download)\n"
    )

    # The stage itself sweeps the killed run's temporaries (DVC, too, clears data/raw before it reruns).
    http.script(TEST_IMAGES, serve)
    assert download(tiny_project).returncode == 0
    assert_complete(tiny_project, mirror_folder)
    rerun = dvc(tiny_project, "repro", "download")
    assert stages_run(rerun) == ["download"]
    assert_complete(tiny_project, mirror_folder)


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_verifies_by_payload_checksum(tiny_project: Path) -> None:
    registry = yaml.safe_load((tiny_project / "stages" / "datasets.yaml").read_text())["fashion-mnist"]
    # Debian re-gzipped the files: no .gz md5 is upstream's, so only the payload checksum can accept them.
    for spec in registry["files"].values():
        assert hashlib.md5((DEBIAN_FASHION / spec["name"]).read_bytes()).hexdigest() != spec["gz_md5"]
    set_params(tiny_project, **{"data.dataset": "fashion-mnist", "data.mirrors": [], "data.retries": 0})
    result = download(tiny_project)
    assert result.returncode == 0, result.stderr
    assert served_from(result) == dict.fromkeys(NAMES, f"{DEBIAN_FASHION}/")
    assert all(line.endswith(", payload sha256 verified") for line in result.stderr.splitlines())
    raw = tiny_project / "data" / "raw"
    for spec in registry["files"].values():
        payload = raw / spec["name"].removesuffix(".gz")
        assert payload.stat().st_size == spec["payload_size"]
    manifest = yaml.safe_load((raw / "dataset.json").read_text())
    assert manifest["dataset"] == "fashion-mnist" and manifest["classes"][9] == "Ankle boot"
