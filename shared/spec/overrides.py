"""Derived specs: dotted-path overrides (sweeps, `--set KEY=VALUE`), validated like a file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, get_origin

import yaml
from pydantic import BaseModel

from shared.errors import SpecError
from shared.spec.errors import unknown_key_message, unwrap_annotation
from shared.spec.run_spec import SEEDED_SECTIONS, RunSpec, spec_to_dict
from shared.spec.yaml_io import parse_yaml_value, spec_from_dict
from shared.yaml_budget import YAMLBudgetError

# Overriding one side of an either/or pair clears the other (a sweep over epochs must not
# collide with the default steps).
_EITHER_OR = {
    "train.steps": "train.epochs",
    "train.epochs": "train.steps",
    "sae.epochs": "sae.tokens",
    "sae.tokens": "sae.epochs",
}


def apply_overrides(
    spec: RunSpec, overrides: Mapping[str, Any], source: str = "overrides"
) -> RunSpec:
    """A new spec with dotted-path values replaced, validated like a file.

    Unknown paths are errors with a suggestion. Setting one of train.steps/epochs or
    sae.epochs/tokens clears the other; changing run.seed moves the section seeds that
    followed it (were equal to it) along.
    """
    data = spec_to_dict(spec)
    for path, value in overrides.items():
        parts = path.split(".")
        check_override_path(parts, path, source)
        cursor = data
        for part in parts[:-1]:
            if not isinstance(cursor.get(part), dict):
                cursor[part] = {}
            cursor = cursor[part]
        cursor[parts[-1]] = value
        partner = _EITHER_OR.get(path)
        if partner is not None and value is not None and partner not in overrides:
            pair_section, pair_key = partner.split(".")
            data[pair_section][pair_key] = None
    if "run.seed" in overrides:
        for name in SEEDED_SECTIONS:
            section = data.get(name)
            if (
                isinstance(section, dict)
                and f"{name}.seed" not in overrides
                and section.get("seed") == spec.run.seed
            ):
                section["seed"] = None
    return spec_from_dict(data, source)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs (a benchmark's `--set`) as overrides; values are read as YAML, in
    the spec files' dialect, so `custom.lr=1e-3` is the number a spec file would give."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {pair}: expected KEY=VALUE, e.g. train.steps=100")
        try:
            out[key.strip()] = parse_yaml_value(value)
        except YAMLBudgetError as err:
            raise SpecError(f"--set {key.strip()}: the value {err}") from None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None)
            why = f" ({problem})" if problem else ""
            raise SpecError(f"--set {pair}: the value is not valid YAML{why}") from None
    return out


def check_override_path(parts: list[str], path: str, source: str) -> None:
    """Refuse a dotted `path` (split into `parts`) that names no spec field, with a suggestion.

    Checked before any value is set, so a typo is reported at the path a person wrote; sweep
    files use it too, so their parameters get the same hints as overrides and spec files.
    """
    annotation: Any = RunSpec
    for depth, part in enumerate(parts):
        annotation = unwrap_annotation(annotation)
        if get_origin(annotation) is dict:
            return  # custom and run.tags take any key
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise SpecError(
                f"{source}: {path}: {'.'.join(parts[:depth])} is a value, not a section"
            )
        field = annotation.model_fields.get(part)
        if field is None:
            raise SpecError(
                f"{source}: {'.'.join(parts[: depth + 1])}: "
                f"{unknown_key_message(tuple(parts[:depth]), part)}"
            )
        annotation = field.annotation
