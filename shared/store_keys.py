"""Store keys: what a key or a listing prefix may look like, checked once for every backend.

A key is the only thing stages share, so a bad one must fail here with one sentence, before
any backend turns it into a path or an S3 object name.
"""

from __future__ import annotations

import re

from shared.errors import LayoutError

__all__ = ["IN_FLIGHT_NAME_RE", "validate_key", "validate_prefix"]

# In-flight local writes are named `.<name>.tmp-<16 hex>`; keys may not look like that.
IN_FLIGHT_NAME_RE = re.compile(r"^\..*\.tmp-[0-9a-f]{16}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
#: A key segment is a file name in a folder store (Linux's NAME_MAX)...
MAX_SEGMENT_BYTES = 255
#: ...and a whole key at most S3's limit, so both stores refuse the same keys, in one line.
MAX_KEY_BYTES = 1024


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise `LayoutError`.

    Every key of every store goes through here, so no key can climb out of the store
    root (`..`), alias another key (`a//b`, `./a`), or collide with an in-flight temp file.
    """
    _check_path_like(key, "key", allow_trailing_slash=False)
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: "" or a key-like string, possibly ending with "/"."""
    if prefix == "":
        return prefix
    _check_path_like(prefix, "prefix", allow_trailing_slash=True)
    return prefix


def _check_path_like(value: str, what: str, *, allow_trailing_slash: bool) -> None:
    if not isinstance(value, str):
        raise LayoutError(f"store {what} must be a string, got {value!r}")
    problem = None
    if not value:
        problem = "is empty"
    elif len(value.encode()) > MAX_KEY_BYTES:
        problem = f"is over {MAX_KEY_BYTES} bytes (S3's limit for a key)"
    elif value.startswith("/"):
        problem = "starts with '/' (keys are relative to the store)"
    elif "\\" in value:
        problem = "contains a backslash (use '/' between segments)"
    elif _CONTROL_RE.search(value):
        problem = "contains a control character"
    else:
        segments = value.split("/")
        if allow_trailing_slash and segments[-1] == "":
            segments.pop()
        for segment in segments:
            if segment == "":
                problem = "has an empty segment ('//' or a trailing '/')"
            elif segment in (".", ".."):
                problem = f"has a {segment!r} segment"
            elif IN_FLIGHT_NAME_RE.match(segment):
                problem = f"has a segment {segment!r} reserved for in-flight writes"
            elif len(segment.encode()) > MAX_SEGMENT_BYTES:
                problem = f"has a segment of over {MAX_SEGMENT_BYTES} bytes (a file name limit)"
            if problem:
                break
    if problem:
        raise LayoutError(f"store {what} {value!r} {problem}")
