"""The object store every stage reads from and writes to: a local folder or S3.

Stages never share memory or files, only store keys, so the store is the one place
that decides what a key may look like, how a write becomes visible (all at once, never
half-written), and how a failure reads to a person (one sentence naming the URL and what
to do). `open_store(url)` picks the backend from the URL; both backends behave the same
way, and the test suite runs one behaviour suite against both.

This module is the entry point: the rest of driftlab imports the store from here. The
parts live beside it: `store_keys` (what a key may be), `store_base` (the `Store`
interface and its formats), `store_tensors` (safetensors), `store_local` and `store_s3`
(the two backends).

Listing uses plain string-prefix semantics, exactly like S3: `list("a/b")` returns
`a/b/x` *and* `a/bc/y`; pass `"a/b/"` to mean "inside folder a/b".
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from shared.errors import ArtifactNotFound, JsonLinesError, LayoutError, StoreError
from shared.store_base import Store
from shared.store_keys import validate_key
from shared.store_local import LocalStore
from shared.store_s3 import (
    DEFAULT_PARALLEL_UPLOADS,
    DEFAULT_PART_SIZE,
    DEFAULT_RETRY_SECONDS,
    DEFAULT_S3_ENDPOINT,
    S3Store,
)

__all__ = [
    "DEFAULT_PARALLEL_UPLOADS",
    "DEFAULT_PART_SIZE",
    "DEFAULT_RETRY_SECONDS",
    "DEFAULT_S3_ENDPOINT",
    "DEFAULT_STORE_URL",
    "ArtifactNotFound",
    "JsonLinesError",
    "LayoutError",
    "LocalStore",
    "S3Store",
    "Store",
    "StoreError",
    "open_store",
    "validate_key",
]

DEFAULT_STORE_URL = "./driftlab-data"
SUPPORTED_SCHEMES = ("a plain path", "file:///abs/path", "s3://bucket/prefix")


def open_store(url: str | os.PathLike[str]) -> Store:
    """The store named by `url`: a plain path, `file:///abs/path` or `s3://bucket/prefix`.

    S3 settings come from the environment (`DRIFTLAB_S3_ENDPOINT`, `AWS_ACCESS_KEY_ID`,
    `AWS_SECRET_ACCESS_KEY`, optional `AWS_REGION`), never from the URL or the spec, so a
    run spec or a log line can never leak credentials.
    """
    if not isinstance(url, str):
        return LocalStore(os.fspath(url))
    if not url.strip():
        raise StoreError(f"store URL is empty; use {', '.join(SUPPORTED_SCHEMES)}")
    if "://" not in url:
        return LocalStore(url)
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise StoreError(
                f"store URL {url!r} must name an absolute local path, like file:///abs/path"
            )
        return LocalStore(unquote(parts.path))
    if parts.scheme == "s3":
        return S3Store.from_url(url)
    raise StoreError(
        f"store URL {url!r} has unsupported scheme {parts.scheme!r}; "
        f"use {', '.join(SUPPORTED_SCHEMES)}"
    )
