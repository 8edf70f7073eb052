"""The run spec: one YAML file that drives every stage of a driftlab run.

Why it is built this way:

- Every section is a pydantic model with ``extra="forbid"``: a typo (``train.lr``) must stop
  the run before any compute is spent, with one line naming the file, the dotted path and
  the fix (``configs/x.yaml: train.lr: unknown key (did you mean train.learning_rate?)``).
- Every field has a default that makes the tiny CPU demo work, so a spec only states what
  differs from it, and ``spec_to_yaml`` prints the fully resolved spec that a run stores as
  ``spec.yaml``: what ran is always on record, defaults included.
- ``custom`` is the one free-form section: a new hyperparameter can go there before it is
  a field, and ``driftlab runs`` shows it as a column like any other dotted path.
- Specs are frozen. A stage cannot change the spec it was given; sweeps derive new specs
  with ``apply_overrides``, which validates like a file does.
- Section seeds left out (or ``null``) follow ``run.seed``, so one number reseeds a run,
  while each section can still be pinned on its own.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from shared.errors import SpecError
from shared.spec.analysis import (
    DYNAMICS_FEATURES,
    DetectSpec,
    EvaluateSpec,
    ExtractSpec,
    HMMSpec,
    OTSpec,
    SAESpec,
)
from shared.spec.fields import one_line, show_value
from shared.spec.resources import ResourcesSpec, StageResources
from shared.spec.run_spec import (
    SECTIONS,
    SEEDED_SECTIONS,
    RunSpec,
    flatten_spec,
    model_sizes,
    sae_layers,
    section_digest,
    spec_to_dict,
)
from shared.spec.training import (
    MODEL_PRESETS,
    DataSpec,
    ModelSizes,
    ModelSpec,
    RunSection,
    TrainSpec,
)

__all__ = [
    "DYNAMICS_FEATURES",
    "MODEL_PRESETS",
    "SECTIONS",
    "DataSpec",
    "DetectSpec",
    "EvaluateSpec",
    "ExtractSpec",
    "HMMSpec",
    "ModelSizes",
    "ModelSpec",
    "OTSpec",
    "ResourcesSpec",
    "RunSection",
    "RunSpec",
    "SAESpec",
    "SpecError",
    "StageResources",
    "TrainSpec",
    "apply_overrides",
    "check_override_path",
    "flatten_spec",
    "load_spec",
    "model_sizes",
    "parse_overrides",
    "parse_spec",
    "read_yaml_file",
    "sae_layers",
    "section_digest",
    "show_value",
    "spec_from_dict",
    "spec_to_dict",
    "spec_to_yaml",
]


# -- YAML --------------------------------------------------------------------------------

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


# -- loading and errors ------------------------------------------------------------------


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
        data = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader subclass
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
        lines = list(dict.fromkeys(_describe(e) for e in err.errors(include_url=False)))
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise SpecError(f"{source}: {lines[0]}{more}") from None


def _kind(value: Any) -> str:
    return "a list" if isinstance(value, list) else show_value(value)


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_parsing_size": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "mapping_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
}
_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _describe(error: Any) -> str:
    """`dotted.path: problem` for one pydantic error, in words a spec author can act on."""
    kind: str = error["type"]
    loc = tuple(error["loc"])
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "driftlab_spec":
        if ctx.get("field"):
            loc += tuple(ctx["field"].split("."))
        return f"{_dotted(loc) or 'top level'}: {ctx['message']}"
    if loc and loc[-1] == "[key]":  # a dict key failed its type: the key is loc[-2]
        return (
            f"{_dotted(loc[:-2]) or 'top level'}: keys must be strings, got {show_value(loc[-2])}"
        )
    if kind == "invalid_key":
        return (
            f"{_dotted(loc[:-1]) or 'top level'}: keys must be strings, got {show_value(loc[-1])}"
        )
    path = _dotted(loc) or "top level"
    if kind == "extra_forbidden":
        return f"{path}: {unknown_key_message(loc[:-1], str(loc[-1]))}"
    if kind == "literal_error":
        options = _literal_options(_annotation_at(loc))
        if options:
            hint = difflib.get_close_matches(str(value), options, n=1)
            return f"{path}: must be one of {', '.join(options)}; got {show_value(value)}" + (
                f" (did you mean {hint[0]}?)" if hint else ""
            )
        return f"{path}: must be {ctx.get('expected', 'one of the allowed values')}; got {show_value(value)}"
    if kind in _EXPECTED:
        return f"{path}: expected {_EXPECTED[kind]}, got {show_value(value)}"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        bound = ctx.get(key)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)  # pydantic reports `gt=0` of a float field as 0.0
        return f"{path}: must be {op} {bound}, got {show_value(value)}"
    if kind == "finite_number":
        return f"{path}: must be a finite number, got {show_value(value)}"
    if kind == "string_too_short":
        return f"{path}: must not be empty"
    if kind == "too_short":
        return f"{path}: needs at least {ctx.get('min_length')} item(s), got {show_value(value)}"
    if kind == "too_long":
        return f"{path}: allows at most {ctx.get('max_length')} item(s), got {show_value(value)}"
    return f"{path}: {one_line(str(error.get('msg', 'is invalid')))}"


def unwrap_annotation(annotation: Any) -> Any:
    """Strip Annotated and Optional to reach the type that validates a value."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, type(int | None)):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _annotation_at(loc: tuple[Any, ...]) -> Any:
    """The type that validates the value at `loc` of a RunSpec, or None when unknown."""
    annotation: Any = RunSpec
    for part in loc:
        annotation = unwrap_annotation(annotation)
        origin = get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            annotation = field.annotation
        elif origin in (list, tuple) and isinstance(part, int):
            args = get_args(annotation)
            annotation = args[min(part, len(args) - 1)] if origin is tuple else args[0]
        elif origin is dict:
            annotation = get_args(annotation)[1]
        else:
            return None
    return unwrap_annotation(annotation)


def _literal_options(annotation: Any) -> list[str]:
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    return []


# Names people carry over from other tools, mapped to driftlab's.
_SYNONYMS = {
    "lr": "learning_rate",
    "wd": "weight_decay",
    "bs": "batch_size",
    "max_steps": "steps",
    "num_steps": "steps",
    "train_steps": "steps",
    "num_epochs": "epochs",
    "n_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "grad_accumulation": "grad_accum",
    "warmup": "warmup_steps",
    "lr_schedule": "schedule",
    "scheduler": "schedule",
    "max_grad_norm": "clip_grad",
    "grad_clip": "clip_grad",
    "dtype": "precision",
    "mixed_precision": "precision",
    "save_every": "checkpoint_every",
    "ckpt_every": "checkpoint_every",
    "resume": "resume_from",
    "block_size": "n_positions",
    "n_ctx": "n_positions",
    "context_length": "n_positions",
    "seq_len": "max_length",
    "max_seq_len": "max_length",
    "d_model": "n_embd",
    "hidden_size": "n_embd",
    "n_layers": "n_layer",
    "num_layers": "n_layer",
    "num_hidden_layers": "n_layer",
    "n_heads": "n_head",
    "num_heads": "n_head",
    "num_attention_heads": "n_head",
    "initializer_range": "init_std",
    "model_name": "pretrained",
    "dataset_name": "hub_name",
    "epsilon": "reg",
    "eps": "reg",
    "num_projections": "n_projections",
    "expansion_factor": "expansion",
    "l1_coefficient": "l1_coeff",
    "l0_coefficient": "l0_coeff",
    "num_components": "max_components",
    "n_components": "max_components",
    "n_states": "max_components",
    "covariance_type": "cov_type",
    "num_iter": "n_iter",
    "gpu": "gpus",
    "mem": "memory",
    "cpus": "cpu",
}


def _field_homes() -> dict[str, list[str]]:
    """Field name -> dotted paths of the sections that have it, for cross-section hints."""
    homes: dict[str, list[str]] = {}
    for section, info in RunSpec.model_fields.items():
        annotation = unwrap_annotation(info.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for name in annotation.model_fields:
                homes.setdefault(name, []).append(f"{section}.{name}")
    return homes


def unknown_key_message(parent: tuple[Any, ...], key: str) -> str:
    """'unknown key' plus the likeliest intended key, or the valid ones when none is close."""
    model = _annotation_at(parent)
    is_model = isinstance(model, type) and issubclass(model, BaseModel)
    siblings = list(model.model_fields) if is_model else []
    suggestion = _suggest_key(key, siblings)
    if suggestion is not None:
        return f"unknown key (did you mean {_dotted((*parent, suggestion))}?)"
    homes = _field_homes()
    for candidate in (_normal(key), _SYNONYMS.get(_normal(key))):
        if candidate in homes:
            return f"unknown key (did you mean {homes[candidate][0]}?)"
    return f"unknown key (valid keys: {', '.join(siblings)}; free-form values go under custom)"


def _normal(key: str) -> str:
    return re.sub(r"[\s-]+", "_", key.strip().lower())


def _suggest_key(key: str, siblings: list[str]) -> str | None:
    norm = _normal(key)
    if norm in siblings:
        return norm
    synonym = _SYNONYMS.get(norm)
    if synonym in siblings:
        return synonym
    close = difflib.get_close_matches(norm, siblings, n=1, cutoff=0.6)
    return close[0] if close else None


# -- output, digests and overrides -------------------------------------------------------


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
    """`KEY=VALUE` pairs (a benchmark's `--set`) as overrides; values are read as YAML."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {pair}: expected KEY=VALUE, e.g. train.steps=100")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SpecError(f"--set {pair}: the value is not valid YAML") from None
    return out


def check_override_path(parts: list[str], path: str, source: str) -> None:
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
