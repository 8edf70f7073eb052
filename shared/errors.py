"""Errors meant for people.

Every error driftlab raises on purpose derives from `DriftlabError` and carries one
sentence (what, where, what to do) plus the process exit code the CLI should use, so
`driftlab` and every `python -m services.<stage>` can print one line and exit instead of
showing a traceback from deep inside a library.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class DriftlabError(Exception):
    """Base class: `str(err)` is the one line shown to the user."""

    exit_code: int = 1


class SpecError(DriftlabError):
    """The run spec is malformed, has an unknown key, a wrong type or a bad value."""

    exit_code = 2


class LayoutError(DriftlabError):
    """A run id or store key that would be unsafe or invalid."""

    exit_code = 2


class StoreError(DriftlabError):
    """The object store cannot be reached, refuses the credentials, or fails an operation."""


class ArtifactNotFound(StoreError):
    """A key that should exist in the store does not."""

    exit_code = 2


class JsonLinesError(StoreError):
    """A line of a JSON-lines object is not JSON.

    `line_number` (1-based) and `reason` (the parser's words) are kept apart, so a reader
    that knows what the file should hold can say so in its own message.
    """

    def __init__(self, url: str, line_number: int, reason: str) -> None:
        super().__init__(f"{url} line {line_number} is not valid JSON: {reason}")
        self.line_number = line_number
        self.reason = reason


class InputMissing(DriftlabError):
    """A stage was started before the stage it reads from finished."""

    exit_code = 2


def run_command(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command's handler the way every driftlab entry point does.

    A `DriftlabError` ends as one line on stderr and its exit code, Ctrl-C as 130, a closed
    pipe (`driftlab runs | head`) as success: users never see a traceback for a mistake
    of theirs.
    """
    try:
        return handler(args)
    except DriftlabError as err:
        print(f"driftlab: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("driftlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


class DataError(DriftlabError):
    """A dataset or tokenizer cannot be read: missing path, bad file, empty data, no hub."""

    exit_code = 2


def error_summary(err: BaseException) -> str:
    """`Type: first line` of an exception from a library, for a one-line error of ours."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
