"""Building blocks of the spec's sections: their base class, numbers that refuse YAML
booleans, step and layer selections, and one-line problems worded for a spec author.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

#: numpy's RandomState refuses larger seeds; catching it here beats a crash mid-run.
MAX_SEED = 2**32 - 1


def problem(message: str, field: str = "") -> PydanticCustomError:
    """A validation error whose text is ours; `field` is a dotted path below the error's loc.

    Model-level checks raise at the model's location, so `field` says which key to fix.
    """
    return PydanticCustomError("driftlab_spec", "{message}", {"message": message, "field": field})


def show_value(value: Any) -> str:
    """A value as a person would type it in YAML, short enough for a one-line message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str | int | float | list | tuple | dict):
        text = repr(list(value) if isinstance(value, tuple) else value)
    else:
        text = str(value)
    if len(text) > 60:
        kind = (
            "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) else ""
        )
        text = kind or text[:57] + "..."
    return text


def one_line(text: str) -> str:
    """`text` with every run of whitespace, newlines included, as one space: messages are one line."""
    return " ".join(text.split())


def _no_bool_int(value: Any) -> Any:
    """YAML `true` must not pass as the integer 1 (pydantic's lax mode would allow it)."""
    if isinstance(value, bool):
        raise problem(f"expected an integer, got {show_value(value)}")
    return value


def _no_bool_float(value: Any) -> Any:
    """YAML `true` must not pass as the number 1.0 (pydantic's lax mode would allow it)."""
    if isinstance(value, bool):
        raise problem(f"expected a number, got {show_value(value)}")
    return value


Int = Annotated[int, BeforeValidator(_no_bool_int)]
Float = Annotated[float, BeforeValidator(_no_bool_float)]
Seed = Annotated[int, BeforeValidator(_no_bool_int), Field(ge=0, le=MAX_SEED)]
Beta = Annotated[float, BeforeValidator(_no_bool_float), Field(ge=0, lt=1)]


def _selection(value: Any) -> Any:
    """`all`, or a list of non-negative integers (made sorted and unique).

    Validated by hand because a pydantic union of the two would report one error per
    member, and a person needs one sentence.
    """
    if value == "all":
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise problem(
            f"must be all or a non-empty list of non-negative integers, got {show_value(value)}"
        )
    return sorted(set(value))


Selection = Annotated[Literal["all"] | list[int], BeforeValidator(_selection)]


class Section(BaseModel):
    """Common configuration: unknown keys are errors, values are immutable and finite."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
    )
