"""Stage `download`: fetch the dataset named by `data.dataset`, verify every file, write `data/raw/`.

Mirrors are tried in order (`data.mirrors`, then the registry's own); each file is accepted only when its
checksum matches, and stored decompressed, so `data/raw/` has the same bytes (and DVC hash) whichever
mirror served it: a Debian machine and one that downloaded from upstream share the run-cache.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from stages.artifacts import atomic_file, remove_stale_temporaries, scratch_file, write_json
from stages.cli import StageError, argument_parser, run
from stages.datasets import DatasetSpec, FileSpec, lookup
from stages.params import load_section, require

CHUNK = 1 << 16
BACKOFF_S = 0.5  # first wait before retrying a transient error; doubles per retry
MANIFEST = "dataset.json"


class TransientError(Exception):
    """Worth retrying on the same mirror: a 5xx, a reset connection, a timeout, a short body."""


class MirrorError(Exception):
    """This mirror cannot provide this file; try the next one."""


@dataclasses.dataclass(frozen=True)
class DataParams:
    """`data`: what the download stage fetches, and from where."""

    dataset: str  # a name in stages/datasets.yaml
    mirrors: tuple[str, ...]  # tried before the registry's own mirrors: URLs or local directories
    timeout_s: float  # per connection attempt and per read
    retries: int  # extra attempts per mirror after a transient error (5xx, reset, timeout)

    def __post_init__(self) -> None:
        require(self.timeout_s > 0, "data.timeout_s", "must be > 0")
        require(self.retries >= 0, "data.retries", "must be >= 0")


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the verified IDX files")
    args = parser.parse_args()
    params = load_section(args.params, "data", DataParams)
    dataset = lookup(params.dataset)
    mirrors = [*params.mirrors, *dataset.mirrors]
    for mirror in params.mirrors:
        check_mirror(mirror)
    download_dataset(dataset, mirrors, args.out, timeout_s=params.timeout_s, retries=params.retries)


def check_mirror(mirror: str) -> None:
    scheme = urlparse(mirror).scheme
    if scheme not in ("http", "https", "file", ""):
        raise StageError(
            f"data.mirrors: {mirror!r} has unsupported scheme '{scheme}:'; "
            "use https://, http://, file:// or a local directory"
        )


def download_dataset(dataset: DatasetSpec, mirrors: list[str], out: Path, *, timeout_s: float, retries: int) -> None:
    """Fetch and verify every file of `dataset` into `out`, then write its manifest last."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    (out / MANIFEST).unlink(missing_ok=True)
    for spec in dataset.files.values():
        fetch_file(spec, mirrors, out, timeout_s=timeout_s, retries=retries)
    # The manifest is written last: its presence says every file above was verified.
    write_json(
        out / MANIFEST,
        {
            "dataset": dataset.name,
            "classes": list(dataset.classes),
            "files": {role: spec.payload_name for role, spec in dataset.files.items()},
        },
    )


def fetch_file(spec: FileSpec, mirrors: list[str], out: Path, *, timeout_s: float, retries: int) -> Path:
    """Try each mirror in turn; return the verified, decompressed file, or raise listing every attempt."""
    target = out / spec.payload_name
    failures = []
    for mirror in mirrors:
        source = join(mirror, spec.name)
        for attempt in range(retries + 1):
            try:
                with scratch_file(out, spec.name) as compressed, atomic_file(target) as payload:
                    copy_from(source, compressed, timeout_s=timeout_s, label=spec.name)
                    verify_and_decompress(spec, compressed, payload)
                return target
            except TransientError as error:
                if attempt < retries:
                    wait = BACKOFF_S * 2**attempt
                    warn(f"{spec.name} from {mirror}: {error}; retrying in {wait:g}s")
                    time.sleep(wait)
                    continue
                failures.append(f"{mirror}: {error}")
            except MirrorError as error:
                failures.append(f"{mirror}: {error}")
            warn(f"{spec.name} from {mirror}: {failures[-1].split(': ', 1)[1]}; trying the next mirror")
            break
    tried = "; ".join(failures) if failures else "no mirrors configured"
    raise StageError(
        f"could not get {spec.name} from any mirror ({tried}); add a reachable mirror to data.mirrors in params.yaml"
    )


def join(mirror: str, name: str) -> str:
    return mirror if mirror.endswith(name) else mirror.rstrip("/") + "/" + name


def copy_from(source: str, destination: Path, *, timeout_s: float, label: str) -> None:
    """Copy `source` (URL or path) into `destination`, classifying each failure as transient or not."""
    try:
        with open_source(source, timeout_s) as (stream, expected_size):
            copied = copy_with_progress(stream, destination, expected_size, label)
    except urllib.error.HTTPError as error:
        reason = f"HTTP {error.code} {error.reason}"
        raise (TransientError if error.code >= 500 else MirrorError)(reason) from None
    except TimeoutError:
        raise TransientError(f"timed out after {timeout_s:g}s") from None
    except (ConnectionResetError, http.client.IncompleteRead, http.client.RemoteDisconnected) as error:
        raise TransientError(f"connection broken ({type(error).__name__})") from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise TransientError(f"timed out after {timeout_s:g}s") from None
        raise MirrorError(f"unreachable ({error.reason})") from None
    except FileNotFoundError:
        raise MirrorError("no such file") from None
    except OSError as error:
        raise MirrorError(f"{type(error).__name__}: {error}") from None
    if expected_size is not None and copied != expected_size:
        raise TransientError(f"body ended after {copied} of {expected_size} bytes")


class open_source:
    """Open an http(s) URL, a file:// URL or a local path; yields (stream, size if announced)."""

    def __init__(self, source: str, timeout_s: float) -> None:
        self.source, self.timeout_s = source, timeout_s

    def __enter__(self) -> tuple[BinaryIO, int | None]:
        parsed = urlparse(self.source)
        if parsed.scheme in ("http", "https"):
            request = urllib.request.Request(self.source, headers={"User-Agent": "mnist-dvc-pipeline"})
            self.stream = urllib.request.urlopen(request, timeout=self.timeout_s)
            length = self.stream.headers.get("Content-Length")
            return self.stream, int(length) if length is not None else None
        path = Path(urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else self.source)
        self.stream = open(path, "rb")
        return self.stream, path.stat().st_size

    def __exit__(self, *exc: object) -> None:
        self.stream.close()


def copy_with_progress(stream: BinaryIO, destination: Path, expected_size: int | None, label: str) -> int:
    copied = 0
    started = time.monotonic()
    with open(destination, "wb") as sink, progress_bar(expected_size, label) as bar:
        for block in iter(lambda: stream.read(CHUNK), b""):
            sink.write(block)
            copied += len(block)
            bar(len(block))
    if not sys.stderr.isatty():
        seconds = max(time.monotonic() - started, 1e-6)
        print(
            f"{label}: {copied:,} bytes in {seconds:.1f}s ({copied / seconds / 1e6:.1f} MB/s)",
            file=sys.stderr,
        )
    return copied


class progress_bar:
    """A tqdm bar on a terminal; nothing per block otherwise (one summary line per file keeps CI logs short)."""

    def __init__(self, total: int | None, label: str) -> None:
        self.total, self.label, self.bar = total, label, None

    def __enter__(self):
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.label, unit="B", unit_scale=True, unit_divisor=1024)
            return self.bar.update
        return lambda _count: None

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def verify_and_decompress(spec: FileSpec, compressed: Path, payload: Path) -> None:
    """Accept the file if its .gz md5 or its decompressed sha256 matches the registry; else MirrorError."""
    gz_md5 = digest(compressed, "md5")
    try:
        with gzip.open(compressed, "rb") as source, open(payload, "wb") as sink:
            shutil.copyfileobj(source, sink, CHUNK)
    except (OSError, EOFError) as error:
        raise MirrorError(f"not a valid gzip file ({error})") from None
    if spec.gz_md5 is not None and gz_md5 == spec.gz_md5:
        return
    if spec.payload_sha256 is not None and digest(payload, "sha256") == spec.payload_sha256:
        return
    raise MirrorError(f"checksum mismatch (md5 of .gz {gz_md5})")


def digest(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def warn(message: str) -> None:
    print(f"download: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    run(main)
