"""Specs in and out as YAML: the spec dialect (`1e-3` is a number, duplicate keys are errors),
reading files and text into a validated `RunSpec`, and writing the resolved spec back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shared.errors import SpecError
from shared.spec.errors import describe_validation_error
from shared.spec.fields import one_line, show_value
from shared.spec.run_spec import SECTIONS, RunSpec, spec_to_dict
from shared.yaml_budget import YAMLBudgetError, bounded_load

# YAML 1.1 (PyYAML) reads `1e-3` as a string; people mean a number, so both the loader and
# the dumper (which must quote such strings to round-trip) resolve it as a float.
_EXP_FLOAT_RE = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _SpecLoader(_BaseLoader):
    """Safe YAML (libyaml when present) that reads `1e-3` as a float and refuses duplicate keys.

    A duplicated key silently keeps the last value in plain YAML: a spec with two `train:`
    sections would run with half of what its author wrote.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first on line {first.start_mark.line + 1})",
                    key_node.start_mark,
                )
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


class _SpecDumper(yaml.SafeDumper):
    """Block style, except short lists of scalars, which read best inline (`[0.9, 0.95]`)."""

    def represent_list(self, data: Any) -> yaml.SequenceNode:
        flow = all(not isinstance(v, list | tuple | dict) for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


for _cls in (_SpecLoader, _SpecDumper):
    _cls.add_implicit_resolver(_FLOAT_TAG, _EXP_FLOAT_RE, list("-+0123456789."))
_SpecDumper.add_representer(list, _SpecDumper.represent_list)


def parse_yaml_value(text: str) -> Any:
    """One YAML value in the spec dialect (a `--set` value): `1e-3` is a float here too."""
    return bounded_load(text, _SpecLoader)


def load_spec(path: str | os.PathLike[str]) -> RunSpec:
    """Read and validate the spec at `path`; any problem is one `SpecError` line."""
    data, source = read_yaml_file(
        path, what="spec", examples="configs/", starter="configs/tiny-cpu.yaml"
    )
    return spec_from_dict(data, source)


def parse_spec(text: str, source: str = "<spec>") -> RunSpec:
    """Validate spec YAML `text`; errors name `source` as the file."""
    return spec_from_dict(parse_yaml(text, source, starter="configs/tiny-cpu.yaml"), source)


def read_yaml_file(
    path: str | os.PathLike[str], *, what: str, examples: str, starter: str
) -> tuple[Any, str]:
    """A YAML file read in the spec dialect, with every failure one `SpecError` line.

    Spec and sweep files share this, so both read `1e-3` as a number, reject duplicate
    keys, and word their file errors alike. Returns the data and the path as a string.
    """
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except FileNotFoundError:
        raise SpecError(
            f"{source}: no such file; check the path (examples are in {examples})"
        ) from None
    except IsADirectoryError:
        raise SpecError(f"{source}: is a directory; give the path of a {what} YAML file") from None
    except OSError as err:
        raise SpecError(f"{source}: cannot read it ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SpecError(
            f"{source}: is not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8"
        ) from None
    return parse_yaml(text, source, starter=starter), source


def parse_yaml(text: str, source: str, *, starter: str) -> Any:
    """Parse YAML `text` in the spec dialect; empty text is an error pointing at `starter`."""
    try:
        data = bounded_load(text, _SpecLoader)  # a SafeLoader subclass, under a size budget
    except YAMLBudgetError as err:
        raise SpecError(f"{source}: {err}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = err.problem or err.context or "cannot be parsed"
        raise SpecError(f"{source}: {where}invalid YAML: {one_line(problem)}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{source}: invalid YAML: {one_line(str(err))}") from None
    except RecursionError:
        raise SpecError(f"{source}: invalid YAML: nested too deeply") from None
    if data is None:
        raise SpecError(f"{source}: is empty; start from {starter}")
    return data


def spec_from_dict(data: Mapping[str, Any], source: str = "<spec>") -> RunSpec:
    """Validate already-parsed spec data; errors name `source` as the file."""
    if not isinstance(data, Mapping):
        raise SpecError(
            f"{source}: the top level must be a mapping of sections ({', '.join(SECTIONS)}); "
            f"got {_kind(data)}"
        )
    try:
        return RunSpec.model_validate(dict(data))
    except ValidationError as err:
        raise SpecError(f"{source}: {describe_validation_error(err)}") from None


def _kind(value: Any) -> str:
    return "a list" if isinstance(value, list) else show_value(value)


def spec_to_yaml(spec: RunSpec) -> str:
    """The fully resolved spec as YAML that `parse_spec` reads back to an equal spec."""
    text: str = yaml.dump(
        spec_to_dict(spec),
        Dumper=_SpecDumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=100,
    )
    return text
