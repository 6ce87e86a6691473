"""Fetching the files of a registered dataset from its mirrors, and verifying them.

Mirrors are tried in order; each file is accepted only when its checksum matches the registry, and stored
decompressed, so the folder has the same bytes (and DVC hash) whichever mirror served it: a Debian machine
and one that downloaded from upstream share the run-cache.

torchvision's `download_and_extract_archive` tries one URL, without timeouts it lets us set, retries or a
second checksum for re-packaged mirrors, so the fetching is done here with urllib and tqdm. Progress goes
to the `stages.core.fetch` logger (a warning per failed attempt, a line per file when stderr is not a
terminal, where tqdm draws a bar instead).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from tqdm import tqdm

from stages.core.artifacts import atomic_file, ensure_folder, remove_stale_temporaries, scratch_file
from stages.core.datasets import DatasetSpec, FileSpec
from stages.core.errors import SettingError
from stages.core.files import MANIFEST

log = logging.getLogger(__name__)

CHUNK = 1 << 16
BACKOFF_S = 0.5  # first wait before retrying on the same mirror; doubles per retry ...
MAX_BACKOFF_S = 8.0  # ... up to this, so a large retry count does not turn into minutes of sleeping
TRANSIENT_HTTP = {408, 429}  # worth retrying, like every 5xx: the server is busy, not missing the file
SCHEMES = ("http", "https", "file")


class TransientError(Exception):
    """Worth retrying on the same mirror: a 5xx, a reset connection, a timeout, a short body."""


class MirrorError(Exception):
    """This mirror cannot provide this file; try the next one."""


class WriteError(OSError):
    """Writing the file here failed (a full disk, a file-size limit): no mirror can help, so none is tried."""


class Sink:
    """A file opened for writing whose every failure, the final flush included, is a WriteError naming it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = self._checked(open, path, "wb")

    def write(self, block: bytes) -> None:
        self._checked(self.file.write, block)

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self._checked(self.file.close)

    def _checked(self, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except OSError as error:
            raise WriteError(error.errno, error.strerror, str(self.path)) from None


def prepare_folder(out: Path, dataset: DatasetSpec | None) -> None:
    """Make `out` ready for `dataset`'s files (None: a folder of pictures): sweep a killed run's temporaries,
    remove the old manifest.

    Until the new manifest is written, nothing in `out` claims to be a complete, verified dataset.
    """
    ensure_folder(out)
    for spec in dataset.files.values() if dataset else ():
        for name in (spec.name, spec.payload_name):
            remove_stale_temporaries(out, name)
    (out / MANIFEST).unlink(missing_ok=True)


def fetch_file(spec: FileSpec, mirrors: list[str], out: Path, *, timeout_s: float, retries: int) -> Path:
    """Try each mirror in turn; return the verified, decompressed file, or raise listing every attempt."""
    failures = []
    for index, mirror in enumerate(mirrors):
        try:
            return fetch_from_mirror(spec, mirror, out, timeout_s=timeout_s, retries=retries)
        except MirrorError as error:
            failures.append(f"{mirror}: {error}")
            if index + 1 < len(mirrors):
                log.warning(f"{spec.name} from {mirror}: {error}; trying the next mirror")
    tried = "; ".join(failures) if failures else "no mirrors configured"
    raise SettingError(f"could not get {spec.name} from any mirror ({tried})")


def fetch_from_mirror(spec: FileSpec, mirror: str, out: Path, *, timeout_s: float, retries: int) -> Path:
    """Fetch one file from one mirror, retrying transient errors with capped exponential backoff."""
    source = mirror.rstrip("/") + "/" + spec.name
    target = out / spec.payload_name
    for attempt in range(retries + 1):
        try:
            # Both the .gz and the payload are temporaries in `out`; only a verified payload is renamed.
            with scratch_file(out, spec.name) as compressed, atomic_file(target) as payload:
                size, seconds = copy_from(source, compressed, timeout_s=timeout_s, label=spec.name)
                matched = verify_and_decompress(spec, compressed, payload)
        except TransientError as error:
            if attempt == retries:
                raise MirrorError(f"{error} (after {retries + 1} attempts)" if retries else str(error)) from None
            wait = min(BACKOFF_S * 2**attempt, MAX_BACKOFF_S)
            log.warning(f"{spec.name} from {mirror}: {error}; retry {attempt + 1} of {retries} in {wait:g}s")
            time.sleep(wait)
            continue
        if not stderr_is_terminal():
            # Without a terminal there is no bar: one line per file keeps CI logs readable.
            log.info(
                f"{spec.name}: {size:,} bytes from {mirror} in {seconds:.1f}s "
                f"({size / max(seconds, 1e-6) / 1e6:.1f} MB/s), {matched} verified"
            )
        return target
    raise AssertionError("unreachable: the loop returns or raises")


def copy_from(source: str, destination: Path, *, timeout_s: float, label: str) -> tuple[int, float]:
    """Copy `source` (URL or path) into `destination`; return (bytes, seconds), classifying each failure."""
    started = time.monotonic()
    try:
        with open_source(source, timeout_s) as (stream, expected_size):
            copied = copy_with_progress(stream, destination, expected_size, label)
    except WriteError:
        raise
    except urllib.error.HTTPError as error:
        reason = f"HTTP {error.code} {error.reason}"
        error.close()
        raise (TransientError if error.code >= 500 or error.code in TRANSIENT_HTTP else MirrorError)(reason) from None
    except urllib.error.URLError as error:
        # urllib wraps what happens while connecting; what happens later arrives unwrapped (below).
        raise classify(error.reason, timeout_s, unreachable=True) from None
    except FileNotFoundError:
        raise MirrorError("no such file") from None
    except (OSError, http.client.HTTPException) as error:
        raise classify(error, timeout_s, unreachable=False) from None
    if expected_size is not None and copied != expected_size:
        raise TransientError(f"body ended after {copied:,} of {expected_size:,} bytes")
    return copied, time.monotonic() - started


def classify(error: object, timeout_s: float, *, unreachable: bool) -> Exception:
    if isinstance(error, TimeoutError):
        return TransientError(f"timed out after {timeout_s:g}s")
    if isinstance(error, (ConnectionResetError, ConnectionAbortedError, http.client.IncompleteRead)):
        return TransientError(f"connection broken ({type(error).__name__})")
    if unreachable:
        return MirrorError(f"unreachable ({error})")
    if isinstance(error, http.client.HTTPException):
        return MirrorError(f"bad HTTP response ({type(error).__name__})")
    return MirrorError(f"{type(error).__name__}: {error}")


class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only: urllib would also follow one to ftp://, a scheme we refuse."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urlparse(newurl).scheme
        if scheme not in ("http", "https"):
            fp.close()
            raise MirrorError(f"redirected to unsupported scheme '{scheme}:' ({newurl})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


OPENER = urllib.request.build_opener(HttpOnlyRedirects)


@contextlib.contextmanager
def open_source(source: str, timeout_s: float) -> Iterator[tuple[BinaryIO, int | None]]:
    """Open an http(s) URL, a file:// URL or a local path; yields (stream, size if announced)."""
    parsed = urlparse(source)
    if parsed.scheme in ("http", "https"):
        request = urllib.request.Request(source, headers={"User-Agent": "mnist-dvc-pipeline"})
        with OPENER.open(request, timeout=timeout_s) as stream:
            # http.client's parse of Content-Length: None when absent, malformed or chunked.
            yield stream, stream.length
        return
    path = Path(urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else source)
    with open(path, "rb") as stream:
        yield stream, path.stat().st_size


def copy_with_progress(stream: BinaryIO, destination: Path, expected_size: int | None, label: str) -> int:
    """Copy `stream` into `destination`, with a tqdm bar (bytes, rate) when stderr is a terminal."""
    copied = 0
    bar = tqdm(
        total=expected_size,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not stderr_is_terminal(),
    )
    with Sink(destination) as sink, bar:
        for block in iter(lambda: stream.read(CHUNK), b""):
            sink.write(block)
            copied += len(block)
            bar.update(len(block))
    return copied


def verify_and_decompress(spec: FileSpec, compressed: Path, payload: Path) -> str:
    """Decompress `compressed` into `payload`; return the checksum that matched, or raise MirrorError.

    A file is good when the md5 of its .gz or the sha256 of its payload is the registry's: the second
    accepts a re-compressed mirror (Debian's) whose payload is the original.
    """
    gz_md5 = digest(compressed, "md5")
    payload_sha256 = hashlib.sha256()
    written = 0
    try:
        with gzip.open(compressed, "rb") as source, Sink(payload) as sink:
            for block in iter(lambda: source.read(CHUNK), b""):
                written += len(block)
                # A mirror serving something else must not fill the disk before the checksum says so.
                if spec.payload_size is not None and written > spec.payload_size:
                    raise MirrorError(f"decompresses to more than the expected {spec.payload_size:,} bytes")
                payload_sha256.update(block)
                sink.write(block)
    except WriteError:
        raise
    except (OSError, EOFError, zlib.error) as error:
        raise MirrorError(f"not a valid gzip file ({error})") from None
    if spec.gz_md5 is not None and gz_md5 == spec.gz_md5:
        return ".gz md5"
    if spec.payload_sha256 is not None and payload_sha256.hexdigest() == spec.payload_sha256:
        return "payload sha256"
    raise MirrorError(
        f"checksum mismatch (.gz md5 {gz_md5[:12]}..., payload sha256 {payload_sha256.hexdigest()[:12]}...; "
        "neither is the one in stages/datasets.yaml)"
    )


def digest(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
