"""Argo's `{{...}}` parameters and fan-out items, as the pipeline uses them."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from workflows.local.manifest import DagTask, LocalRunError

_VAR_RE = re.compile(r"{{\s*([^{}]*?)\s*}}")


def substitute(text: str, scope: Mapping[str, str], where: str) -> str:
    """Replace every `{{name}}` from `scope`; an unknown name is an error, as in Argo."""

    def one(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in scope:
            raise LocalRunError(f"{where}: cannot resolve {{{{{key}}}}}")
        return scope[key]

    return _VAR_RE.sub(one, text)


def fan_out(task: DagTask, scope: Mapping[str, str], where: str) -> list[str] | None:
    """The `{{item}}` of each instance of `task`, or None when it is not a fan-out.

    `withParam` is substituted first: the pipeline's is the checkpoint listing's stdout.
    """
    if task.with_items is not None:
        return [_render(item) for item in task.with_items]
    if task.with_param is None:
        return None
    text = substitute(task.with_param, scope, where)
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list):
        raise LocalRunError(f"{where}: withParam is not a JSON list: {text[:200]!r}")
    return [_render(item) for item in items]


def _render(value: Any) -> str:
    """An item as Argo substitutes it: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))
