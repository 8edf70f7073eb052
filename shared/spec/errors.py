"""Pydantic's validation errors rewritten as one line a spec author can act on: the dotted
path, the problem in plain words, and the likeliest fix (`train.lr: unknown key (did you mean
train.learning_rate?)`).
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from shared.spec.fields import one_line, show_value
from shared.spec.run_spec import RunSpec


def describe_validation_error(error: ValidationError) -> str:
    """The first of `error`'s problems as one line, counting the others: a person fixes one
    thing at a time, and needs no pydantic to read it.
    """
    lines = list(dict.fromkeys(_describe(e) for e in error.errors(include_url=False)))
    more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
    return f"{lines[0]}{more}"


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
