"""The S3 store (MinIO in the cluster): retries, integrity checks and one-line errors.

Everything S3 can do wrong (throttling, 5xx, dropped connections, rejected credentials,
a read cut short) is turned here into a bounded retry or a `StoreError` that names the
URL and the setting to check, so a stage never shows a minio traceback.
"""

from __future__ import annotations

import hashlib
import io
import logging
import mimetypes
import os
import random
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar
from urllib.parse import unquote, urlsplit

from shared.errors import ArtifactNotFound, StoreError
from shared.store_base import Store, missing_artifact
from shared.store_keys import validate_key
from shared.store_local import COPY_CHUNK, atomic_write

# minio and urllib3 are imported where they are used: most processes (`driftlab runs`,
# local stages) never need S3, and minio alone costs a quarter second.

__all__ = [
    "DEFAULT_PARALLEL_UPLOADS",
    "DEFAULT_PART_SIZE",
    "DEFAULT_RETRY_SECONDS",
    "DEFAULT_S3_ENDPOINT",
    "S3Store",
]

# The logger of the store as a whole, so retry warnings keep the name users filter on.
log = logging.getLogger("shared.store")

_T = TypeVar("_T")

DEFAULT_S3_ENDPOINT = "https://s3.amazonaws.com"
DEFAULT_RETRY_SECONDS = 20.0
DEFAULT_PART_SIZE = 8 * 1024 * 1024
# An upload holds about (parallel uploads + 2) parts in memory: 32 MiB by default.
DEFAULT_PARALLEL_UPLOADS = 2

_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "InvalidSecurity",
    }
)
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "XMinioServerNotInitialized",
    }
)
_MD5_ETAG_RE = re.compile(r"^[0-9a-f]{32}$")


def _transient_status(status: int) -> bool:
    return status >= 500 or status in (408, 429)


class _ReadMismatch(Exception):
    """What arrived differs from what S3 says it stored: worth another try."""


class _LocalWriteError(Exception):
    """Writing a download to local disk failed: not the network's fault, never retried."""

    def __init__(self, error: OSError) -> None:
        where = f" ({error.filename})" if error.filename else ""
        super().__init__(f"{error.strerror or error}{where}")


def _short_reason(exc: BaseException) -> str:
    """The useful words of a network error ("Connection refused"), without addresses."""
    from urllib3.exceptions import NewConnectionError
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        err = todo.pop(0)
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
        # urllib3's NewConnectionError subclasses its TimeoutError; its cause says more.
        if isinstance(err, socket.timeout | Urllib3Timeout) and not isinstance(
            err, NewConnectionError
        ):
            return "timed out"
        nested = [getattr(err, "reason", None), err.__cause__, err.__context__, *err.args]
        todo.extend(e for e in nested if isinstance(e, BaseException))
    return type(exc).__name__


def _parse_endpoint(endpoint: str) -> tuple[str, bool]:
    """(host[:port], secure) of an endpoint URL; the scheme decides TLS.

    An endpoint with an '@' is refused without being repeated: what comes before it may be
    credentials (`KEY:SECRET@host:9000`, a scheme-less mistake, parses as no user at all).
    """
    parts = urlsplit(endpoint.strip())
    if parts.username or parts.password or "@" in endpoint:
        raise StoreError(
            "DRIFTLAB_S3_ENDPOINT must not contain credentials; "
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY instead"
        )
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StoreError(
            f"S3 endpoint {endpoint!r} must look like http://host:port or https://host; "
            "check DRIFTLAB_S3_ENDPOINT"
        )
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise StoreError(
            f"S3 endpoint {endpoint!r} must be only scheme://host[:port], without a path; "
            "check DRIFTLAB_S3_ENDPOINT"
        )
    return parts.netloc, parts.scheme == "https"


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise StoreError(f"{name} must be a number of seconds, got {raw!r}") from None


class S3Store(Store):
    """An S3 bucket (MinIO in the cluster) under an optional key prefix.

    Transient failures (network, 5xx, SlowDown) are retried with jittered exponential
    backoff within `retry_max_seconds`; urllib3's own retries are off, so that budget is
    the only one. Rejected credentials are not retried. Reads are checked against the size
    (and, for single-part unencrypted objects, the MD5 ETag) of the very response they came
    in, so a concurrent overwrite cannot cause a false alarm; writes are checked by S3
    itself (signed payload hash over http, Content-MD5 over https). The bucket is created
    before the first write, never by a reader.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str = DEFAULT_S3_ENDPOINT,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        region: str | None = None,
        retry_attempts: int = 10,
        retry_base_delay: float = 0.2,
        retry_max_seconds: float = DEFAULT_RETRY_SECONDS,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        part_size: int = DEFAULT_PART_SIZE,
        parallel_uploads: int = DEFAULT_PARALLEL_UPLOADS,
    ) -> None:
        import certifi
        import urllib3
        from minio import Minio
        from minio.helpers import check_bucket_name

        try:
            check_bucket_name(bucket, strict=True)
        except ValueError as exc:
            raise StoreError(f"invalid S3 bucket name {bucket!r}: {exc}") from None
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        host, secure = _parse_endpoint(endpoint)
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = f"{'https' if secure else 'http'}://{host}"
        self._retry_attempts = max(1, retry_attempts)
        self._retry_base_delay = retry_base_delay
        self._retry_max_seconds = retry_max_seconds
        self._part_size = part_size
        self._parallel_uploads = parallel_uploads
        self._secrets = tuple(s for s in (access_key, secret_key, session_token) if s)
        self._bucket_ready = False
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=False,
            maxsize=max(10, parallel_uploads + 2),
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        self._client = Minio(
            host,
            access_key=access_key,
            secret_key=secret_key,
            session_token=session_token,
            secure=secure,
            region=region,
            http_client=http,
        )

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        """`s3://bucket/prefix` with endpoint, credentials and region from the environment."""
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise StoreError(
                "S3 store URLs must not contain credentials; "
                "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY instead"
            )
        if parts.query or parts.fragment or not parts.netloc:
            raise StoreError(f"store URL {url!r} must look like s3://bucket/prefix")
        return cls(
            parts.netloc,
            unquote(parts.path),
            endpoint=os.environ.get("DRIFTLAB_S3_ENDPOINT", "").strip() or DEFAULT_S3_ENDPOINT,
            access_key=os.environ.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
            retry_max_seconds=_float_env("DRIFTLAB_S3_RETRY_SECONDS", DEFAULT_RETRY_SECONDS),
        )

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Store(url={self.url!r}, endpoint={self.endpoint!r})"

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- retries and error translation ---------------------------------------------------

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _call(self, action: str, key: str | None, fn: Callable[[], _T]) -> _T:
        """Run one S3 operation with bounded retries; every failure leaves as a StoreError."""
        from minio.error import InvalidResponseError, S3Error, ServerError
        from urllib3.exceptions import HTTPError, SSLError

        where = self.url_of(key) if key is not None else self.url
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            network = False
            try:
                return fn()
            except S3Error as exc:
                code = exc.code or "UnknownError"
                if code in _MISSING_CODES and key is not None:
                    raise missing_artifact(where) from None
                if code in _CREDENTIAL_CODES:
                    raise StoreError(
                        f"S3 at {self.endpoint} rejected the credentials for s3://{self.bucket} "
                        f"({code}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and that "
                        "they may use this bucket"
                    ) from None
                detail = f"{code}: {self._scrub(exc.message or '')}".rstrip(": ")
                if code not in _TRANSIENT_CODES and not _transient_status(exc.response.status):
                    raise StoreError(f"S3 could not {action} {where}: {detail}") from None
                reason = detail
            except ServerError as exc:
                reason = f"HTTP {exc.status_code}"
            except InvalidResponseError as exc:
                status = int(getattr(exc, "_code", 0) or 0)
                if not _transient_status(status):
                    raise StoreError(
                        f"{self.endpoint} did not answer like S3 when asked to {action} {where} "
                        f"(HTTP {status}); check DRIFTLAB_S3_ENDPOINT"
                    ) from None
                reason = f"HTTP {status}"
            except _ReadMismatch as exc:
                reason = str(exc)
            except SSLError as exc:
                raise StoreError(
                    f"TLS with S3 endpoint {self.endpoint} failed ({_short_reason(exc)}); "
                    "check DRIFTLAB_S3_ENDPOINT (http or https) and SSL_CERT_FILE"
                ) from None
            except HTTPError as exc:
                reason = _short_reason(exc)
                network = True
            except _LocalWriteError as exc:
                raise StoreError(f"cannot save {where} to local disk: {exc}") from None

            elapsed = time.monotonic() - start
            delay = min(5.0, self._retry_base_delay * 2 ** (attempt - 1))
            delay = delay / 2 + random.uniform(0, delay / 2)
            if attempt >= self._retry_attempts or elapsed + delay > self._retry_max_seconds:
                summary = f"after {attempt} attempts ({elapsed:.1f}s): {reason}"
                if network:
                    raise StoreError(
                        f"cannot reach S3 endpoint {self.endpoint} {summary}; "
                        "check DRIFTLAB_S3_ENDPOINT"
                    ) from None
                raise StoreError(f"S3 could not {action} {where} {summary}; try again later")
            log.warning("S3 could not %s %s (%s); retrying in %.1fs", action, where, reason, delay)
            time.sleep(delay)

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return

        from minio.error import S3Error

        def ensure() -> None:
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as exc:
                # Another writer created it first; "BucketAlreadyExists" (someone else's
                # bucket) is a real error and surfaces as one.
                if exc.code != "BucketAlreadyOwnedByYou":
                    raise

        self._call("create bucket", None, ensure)
        self._bucket_ready = True

    # -- primitives ----------------------------------------------------------------------

    def _put_bytes(self, key: str, data: bytes) -> None:
        self._ensure_bucket()
        self._call(
            "write",
            key,
            lambda: self._client.put_object(
                self.bucket,
                self._name(key),
                io.BytesIO(data),
                len(data),
                content_type=_content_type(key),
                part_size=self._part_size,
                num_parallel_uploads=self._parallel_uploads,
            ),
        )

    def _put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        from minio.error import S3Error
        from minio.helpers import DictType

        self._ensure_bucket()

        def put() -> bool:
            headers: DictType = {"Content-Type": _content_type(key), "If-None-Match": "*"}
            try:
                # minio's public put_object turns any other header into user metadata
                # (x-amz-meta-if-none-match), so the one-part upload it is built on is used.
                self._client._put_object(self.bucket, self._name(key), data, headers)
            except S3Error as exc:
                if exc.code == "PreconditionFailed":  # an object is there: S3 wrote nothing
                    return False
                raise
            return True

        return self._call("write", key, put)

    def _put_file(self, key: str, path: Path) -> None:
        self._ensure_bucket()
        try:
            self._call(
                "write",
                key,
                lambda: self._client.fput_object(
                    self.bucket,
                    self._name(key),
                    str(path),
                    content_type=_content_type(key),
                    part_size=self._part_size,
                    num_parallel_uploads=self._parallel_uploads,
                ),
            )
        except OSError as exc:
            raise StoreError(
                f"cannot upload {path} to {self.url_of(key)}: {exc.strerror or exc}"
            ) from None

    def _download(self, key: str, sink: IO[bytes]) -> None:
        """Stream the object into `sink`, checking it against the response's own headers."""
        response = self._client.get_object(self.bucket, self._name(key))
        try:
            expected = int(response.headers.get("content-length", "-1"))
            etag = (response.headers.get("etag") or "").strip('"')
            encrypted = "x-amz-server-side-encryption" in response.headers
            md5 = hashlib.md5(usedforsecurity=False)
            size = 0
            for chunk in response.stream(COPY_CHUNK, decode_content=False):
                md5.update(chunk)
                try:
                    sink.write(chunk)
                except OSError as exc:
                    raise _LocalWriteError(exc) from exc
                size += len(chunk)
        finally:
            response.close()
            response.release_conn()
        if expected >= 0 and size != expected:
            raise _ReadMismatch(f"read {size} of {expected} bytes")
        if _MD5_ETAG_RE.match(etag) and not encrypted and md5.hexdigest() != etag:
            raise _ReadMismatch("content does not match its MD5 ETag")

    def _get_bytes(self, key: str) -> bytes:
        def fetch() -> bytes:
            buffer = io.BytesIO()
            self._download(key, buffer)
            return buffer.getvalue()

        return self._call("read", key, fetch)

    def _get_file(self, key: str, path: Path) -> None:
        def fetch() -> None:
            try:
                atomic_write(path, lambda f: self._download(key, f))
            except OSError as exc:  # mkdir, open, fsync or rename of the local file
                raise _LocalWriteError(exc) from exc

        self._call("read", key, fetch)

    def _exists(self, key: str) -> bool:
        try:
            self._call(
                "look up", key, lambda: self._client.stat_object(self.bucket, self._name(key))
            )
        except ArtifactNotFound:
            return False
        return True

    def _size(self, key: str) -> int:
        stat = self._call(
            "look up", key, lambda: self._client.stat_object(self.bucket, self._name(key))
        )
        return int(stat.size or 0)

    def _delete(self, key: str) -> None:
        try:
            self._call(
                "delete", key, lambda: self._client.remove_object(self.bucket, self._name(key))
            )
        except ArtifactNotFound:
            return

    def _listing(self, prefix: str, *, recursive: bool) -> list[str]:
        from minio.error import S3Error

        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0

        def fetch() -> list[str]:
            try:
                objects = self._client.list_objects(self.bucket, prefix=full, recursive=recursive)
                return [str(obj.object_name)[strip:] for obj in objects]
            except S3Error as exc:
                if exc.code == "NoSuchBucket":
                    return []
                raise

        return self._call("list", None, fetch)

    def _list(self, prefix: str) -> list[str]:
        return [k for k in self._listing(prefix, recursive=True) if not k.endswith("/")]

    def _list_dirs(self, prefix: str) -> list[str]:
        return [
            k[len(prefix) : -1] for k in self._listing(prefix, recursive=False) if k.endswith("/")
        ]


def _content_type(key: str) -> str:
    """A real Content-Type, so reports and plots open in a browser from the MinIO console."""
    return mimetypes.guess_type(key)[0] or "application/octet-stream"
