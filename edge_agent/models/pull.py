"""`edge-agent models pull`: download a GGUF over HTTP(S), resumably, verify it, register it.

Standard library networking only, so the agent needs no HTTP dependency. The bytes land in
``<store>/.downloads/<sha256>.part`` and are only handed to the store once their sha256 matches
what the caller pinned: nothing unverified is ever registered. A dropped connection resumes from
the bytes already on disk (``Range: bytes=N-``); a later ``pull`` of the same digest resumes too.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import IO, Any, NoReturn

from ..errors import DownloadError, IntegrityError, InvalidArgument, ModelFileError
from ..logs import kv
from ..progress import Progress
from .gguf_meta import read_gguf_info
from .manifest import ModelManifest
from .store import ModelStore, validate_model_name

__all__ = ["DOWNLOADS_DIR", "pull_gguf"]

log = logging.getLogger(__name__)

DOWNLOADS_DIR = ".downloads"
CHUNK = 1 << 20
USER_AGENT = "edge-agent/0.1"
# Seconds before the n-th retry: doubling from the base, capped. Module level so tests can make
# retries instant without a parameter nobody else needs.
RETRY_BACKOFF_S = 0.5
RETRY_BACKOFF_MAX_S = 8.0
# Statuses that say "not now" rather than "never": worth another attempt.
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

_SHA256 = re.compile(r"^[0-9A-Fa-f]{64}$")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_NAME_JUNK = re.compile(r"[^A-Za-z0-9._-]+")


class _Retryable(Exception):
    """An attempt failed in a way a new connection may fix; ``error`` is what the caller sees
    if no attempt is left."""

    def __init__(self, error: DownloadError) -> None:
        super().__init__(error.message)
        self.error = error


class _RangeRejected(Exception):
    """The server will not continue our part file (416, or a 206 for other bytes than we asked):
    the part is stale and the download must start over."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a redirect to ftp://; a pull promises http(s) only."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        target = urllib.parse.urlsplit(newurl)
        scheme = target.scheme.lower()
        # "@" for the same reason pull_gguf refuses it: urllib would resolve "user:pw@host".
        if scheme not in ("http", "https") or "@" in target.netloc:
            raise DownloadError(
                f"{_redact(req.full_url)} redirects to {_redact(newurl)};"
                " only http and https URLs without credentials are followed",
                url=_redact(req.full_url),
                status=code,
                reason=f"redirect to {scheme or 'no scheme'}",
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _redact(url: str) -> str:
    """The URL without user:password, which must not end up in logs or errors."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _check_arguments(
    url: str, sha256: str, name: str | None, timeout: float, max_bytes: int, retries: int
) -> str:
    """Fail before any I/O; returns the digest in the lower case the store writes."""
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise InvalidArgument(
            f"sha256 must be 64 hexadecimal characters, got {sha256!r}", sha256=str(sha256)
        )
    if not isinstance(url, str) or not url.isprintable() or any(c.isspace() for c in url):
        raise InvalidArgument(f"not a usable URL: {url!r}", url=str(url))
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidArgument(
            f"only http and https URLs can be pulled, got {parts.scheme or 'no scheme'}:"
            f" {_redact(url)}",
            url=_redact(url),
        )
    try:
        host = parts.hostname
        _ = parts.port  # urlsplit only complains about a malformed port when asked for it
    except ValueError as exc:
        raise InvalidArgument(f"malformed URL {_redact(url)}: {exc}", url=_redact(url)) from exc
    if not host:
        raise InvalidArgument(f"URL has no host: {_redact(url)}", url=_redact(url))
    if "@" in parts.netloc:
        # urllib would not send them as credentials but try to resolve "user:pw@host" as a
        # host name, leaking them to the DNS resolver.
        raise InvalidArgument(
            f"credentials in the URL are not supported: {_redact(url)}", url=_redact(url)
        )
    if name is not None:
        validate_model_name(name)
    if (
        not isinstance(timeout, (int, float))
        or isinstance(timeout, bool)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise InvalidArgument(f"timeout must be a positive number of seconds, got {timeout!r}")
    for label, value, low in (("max_bytes", max_bytes, 1), ("retries", retries, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InvalidArgument(f"{label} must be an integer >= {low}, got {value!r}")
    return sha256.lower()


def _already_pulled(store: ModelStore, digest: str, name: str | None) -> ModelManifest | None:
    """The manifest of a model that already holds a verified file with this digest."""
    for model in [name] if name is not None else store.names():
        try:
            if not store.exists(model):
                continue
            manifest = store.get(model)
        except ModelFileError:
            continue  # another model's broken manifest must not block this pull
        for quant, entry in manifest.files.items():
            if entry.sha256.lower() != digest:
                continue
            try:
                store.resolve(model, quant)  # a damaged copy on disk gets downloaded again
            except ModelFileError as exc:
                log.warning(
                    "%s",
                    kv(event="redownload", model=model, quant=quant, reason=exc.message),
                )
                continue
            return manifest
    return None


def _name_from_url(url: str) -> str | None:
    stem = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    stem = _NAME_JUNK.sub("-", stem.removesuffix(".gguf")).lstrip("._-")[:128]
    return stem or None


def _default_name(part: Path, url: str) -> str | None:
    """None lets import_gguf use the GGUF's general.name; without one, the URL's file name
    beats import_gguf's fallback (the part file's stem, i.e. the digest)."""
    try:
        info = read_gguf_info(part)
    except ModelFileError:
        return None  # import_gguf reports it with the same typed error
    return None if info.name else _name_from_url(url)


class _Download:
    """One part file being brought to completion; ``offset`` and ``digest`` always describe
    exactly the bytes on disk, so the final digest needs no second read of the file."""

    def __init__(self, url: str, part: Path, expected: str, timeout: float, max_bytes: int) -> None:
        self.url = url
        self.label = _redact(url)
        self.part = part
        self.expected = expected
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.opener = urllib.request.build_opener(_HttpOnlyRedirects())
        self.digest = hashlib.sha256()
        self.offset = 0
        self.total: int | None = None
        self.requests = 0

    def load_part(self) -> None:
        """Pick up what an earlier, interrupted pull left behind."""
        try:
            with self.part.open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    self.digest.update(chunk)
                    self.offset += len(chunk)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise DownloadError(f"cannot read {self.part}: {exc}", path=str(self.part)) from exc
        if self.offset > self.max_bytes:
            self.restart()

    def restart(self) -> None:
        self.part.unlink(missing_ok=True)
        self.digest = hashlib.sha256()
        self.offset = 0

    def complete(self) -> bool:
        # A part can only be "complete" once its digest is the pinned one: nothing else is
        # trustworthy (Content-Length may be absent, the server may have changed the file).
        return self.offset > 0 and self.digest.hexdigest() == self.expected

    def run(self, retries: int, bar: Progress) -> str:
        """Download until complete; returns the sha256 of the bytes on disk."""
        failures = 0
        # Failures are counted; restarts are not, but a restart needs bytes on disk, which only
        # the leftover part file or a counted failure leaves. So at most 2 * (retries + 1)
        # requests happen; the explicit cap makes that bound visible rather than argued.
        for _ in range(2 * (retries + 1) + 1):
            bar.done = self.offset / CHUNK
            if self.complete():
                return self.digest.hexdigest()
            try:
                self.attempt(bar)
                return self.digest.hexdigest()
            except _RangeRejected as exc:
                log.info("%s", kv(event="download_restart", file=self.label, reason=str(exc)))
                self.restart()
                continue
            except _Retryable as exc:
                failures += 1
                if failures > retries:
                    self._give_up(exc.error, failures)
                delay = min(RETRY_BACKOFF_S * 2 ** (failures - 1), RETRY_BACKOFF_MAX_S)
                log.warning(
                    "%s",
                    kv(
                        event="download_retry",
                        error=exc.error.message,
                        attempt=failures,
                        attempts=retries + 1,
                        resume_at=self.offset,
                        delay_s=delay,
                    ),
                )
                time.sleep(delay)
        raise DownloadError(
            f"{self.label}: no complete download after {self.requests} requests",
            url=self.label,
            requests=self.requests,
        )

    def _give_up(self, error: DownloadError, attempts: int) -> NoReturn:
        raise DownloadError(
            f"{error.message} (gave up after {attempts} attempts; {self.offset} bytes kept in"
            f" {self.part} for the next pull to resume)",
            **error.data,
            attempts=attempts,
            bytes_done=self.offset,
        )

    def _network_error(self, exc: BaseException) -> _Retryable:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        text = str(reason) or type(reason).__name__
        return _Retryable(
            DownloadError(f"{self.label}: network error: {text}", url=self.label, reason=text)
        )

    def _too_big(self, size: int) -> NoReturn:
        self.restart()
        raise DownloadError(
            f"{self.label} is larger than the {self.max_bytes}-byte limit ({size} bytes or more)",
            url=self.label,
            limit=self.max_bytes,
            size=size,
        )

    def attempt(self, bar: Progress) -> None:
        """One request. Returns once the file is complete; otherwise raises, typed by what to
        do next: _Retryable, _RangeRejected, or DownloadError (final)."""
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        resuming = self.offset > 0
        if resuming:
            headers["Range"] = f"bytes={self.offset}-"
        request = urllib.request.Request(self.url, headers=headers)
        self.requests += 1
        try:
            response = self.opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()  # the error page is of no use, and its socket must not linger
            if exc.code == 416 and resuming:
                raise _RangeRejected(
                    f"server cannot continue from byte {self.offset} (HTTP 416)"
                ) from None
            error = DownloadError(
                f"{self.label}: HTTP {exc.code} {exc.reason}",
                url=self.label,
                status=exc.code,
                reason=str(exc.reason),
            )
            if exc.code in TRANSIENT_STATUSES:
                raise _Retryable(error) from None
            raise error from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise self._network_error(exc) from None
        with response:
            self._receive(response, resuming, bar)

    def _receive(self, response: http.client.HTTPResponse, resuming: bool, bar: Progress) -> None:
        status = response.status
        body_length = response.length  # None when chunked or close-delimited
        if status == 206 and resuming:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match is None:
                raise DownloadError(
                    f"{self.label}: HTTP 206 without a usable Content-Range"
                    f" ({response.headers.get('Content-Range')!r})",
                    url=self.label,
                    status=status,
                    reason="bad Content-Range",
                )
            if int(match.group(1)) != self.offset:
                raise _RangeRejected(
                    f"asked for bytes from {self.offset}, server sent from {match.group(1)}"
                )
            if match.group(3) != "*":
                self.total = int(match.group(3))
            elif body_length is not None:
                self.total = self.offset + body_length
        elif status == 200:
            if resuming:
                log.info(
                    "%s",
                    kv(event="download_restart", file=self.label, reason="server ignored Range"),
                )
                self.restart()
            self.total = body_length
        else:
            raise DownloadError(
                f"{self.label}: unexpected HTTP {status} {response.reason}",
                url=self.label,
                status=status,
                reason=str(response.reason),
            )
        if self.total is not None:
            bar.total = self.total / CHUNK
            if self.total > self.max_bytes:
                self._too_big(self.total)
        bar.done = self.offset / CHUNK
        received = 0
        try:
            handle = self.part.open("ab" if self.offset else "wb")
        except OSError as exc:
            raise DownloadError(f"cannot write {self.part}: {exc}", path=str(self.part)) from exc
        with handle:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise self._network_error(exc) from None
                if not chunk:
                    break
                if self.offset + len(chunk) > self.max_bytes:
                    handle.close()
                    self._too_big(self.offset + len(chunk))
                try:
                    handle.write(chunk)
                except OSError as exc:
                    raise DownloadError(
                        f"cannot write {self.part}: {exc}", path=str(self.part)
                    ) from exc
                # Only after the write succeeded, so digest and file never disagree.
                self.digest.update(chunk)
                self.offset += len(chunk)
                received += len(chunk)
                bar.advance(len(chunk) / CHUNK)
        # http.client returns b"" on a connection closed before Content-Length instead of
        # raising, so a short body has to be caught here.
        if body_length is not None and received < body_length:
            raise _Retryable(
                DownloadError(
                    f"{self.label}: connection closed after {received} of {body_length} bytes",
                    url=self.label,
                    reason="connection closed early",
                )
            )
        if self.total is not None and self.offset < self.total:
            raise _Retryable(
                DownloadError(
                    f"{self.label}: got {self.offset} of {self.total} bytes",
                    url=self.label,
                    reason="incomplete",
                )
            )


def pull_gguf(
    store: ModelStore,
    url: str,
    sha256: str,
    *,
    name: str | None = None,
    timeout: float = 30.0,
    max_bytes: int = 64 * 2**30,
    retries: int = 3,
) -> ModelManifest:
    """Download the GGUF at ``url``, check it against ``sha256``, register it in ``store``.

    Idempotent: a model that already holds a verified file with this digest (``name``'s, or
    any model's when ``name`` is None) is returned without touching the network. ``timeout``
    bounds each connect and each read; ``retries`` bounds the reconnects after a dropped
    connection or a transient HTTP status (each one resumes where the last stopped).

    Raises InvalidArgument (bad URL, digest, name or limits), DownloadError (HTTP status,
    network failure, size over ``max_bytes``), IntegrityError (the bytes are not the pinned
    ones; the part file is deleted) and ModelFileError (not a usable embedding GGUF).
    """
    expected = _check_arguments(url, sha256, name, timeout, max_bytes, retries)
    existing = _already_pulled(store, expected, name)
    if existing is not None:
        log.info("%s", kv(event="already_stored", sha256=expected, model=existing.name))
        return existing
    label = _redact(url)
    part = store.root / DOWNLOADS_DIR / f"{expected}.part"
    try:
        part.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create {part.parent}: {exc}", path=str(part.parent)) from exc
    download = _Download(url, part, expected, timeout, max_bytes)
    download.load_part()
    file_name = PurePosixPath(urllib.parse.urlsplit(url).path).name or expected[:12]
    with Progress(f"download {file_name}", total=None, unit=" MiB") as bar:
        actual = download.run(retries, bar)
    if actual != expected:
        # Resuming from these bytes could never succeed: they are wrong somewhere.
        part.unlink(missing_ok=True)
        raise IntegrityError(
            f"{label}: downloaded sha256 {actual} does not match the expected {expected}",
            url=label,
            expected=expected,
            actual=actual,
        )
    try:
        return store.import_gguf(
            part, name=name or _default_name(part, url), source_label=label, move=True
        )
    except ModelFileError:
        # Verified bytes that are not a usable model stay unusable: keep nothing.
        part.unlink(missing_ok=True)
        raise
