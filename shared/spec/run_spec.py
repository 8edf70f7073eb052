"""The whole run's spec: its sections, the seeds that follow `run.seed`, the free-form `custom`
section, the checks that span sections, and the resolved spec as plain data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any, Self

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from shared.spec.analysis import DetectSpec, EvaluateSpec, ExtractSpec, HMMSpec, OTSpec, SAESpec
from shared.spec.fields import Section, Seed, problem, show_value
from shared.spec.resources import ResourcesSpec
from shared.spec.training import DataSpec, ModelSizes, ModelSpec, RunSection, TrainSpec

#: Top-level sections, in the order `spec_to_yaml` writes them.
SECTIONS = (
    "run",
    "model",
    "data",
    "train",
    "extract",
    "ot",
    "sae",
    "detect",
    "evaluate",
    "hmm",
    "resources",
    "custom",
)

#: Sections with a `seed` that follows `run.seed` unless set.
SEEDED_SECTIONS = ("data", "train", "extract", "ot", "sae", "detect", "evaluate", "hmm")


def _plain(value: Any, path: str, depth: int = 0) -> Any:
    """`value` as plain JSON-able data; dates become ISO strings.

    `custom` accepts anything a person can write, but it is digested and shown as
    columns, so it must survive JSON: YAML dates are turned into strings, anything else
    that is not JSON (sets, binary) is refused.
    """
    if depth > 32:
        raise problem("is nested too deeply (more than 32 levels)", path)
    if isinstance(value, float) and not math.isfinite(value):
        raise problem(f"must be a finite number, got {value}", path)
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_plain(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise problem(f"keys must be strings, got {show_value(k)}", path)
            out[k] = _plain(v, f"{path}.{k}" if path else k, depth + 1)
        return out
    raise problem(
        f"must be a string, number, boolean, null, list or mapping; got {type(value).__name__}",
        path,
    )


class RunSpec(Section):
    """A whole run: every stage reads its own section, and `run` says which run it is."""

    run: RunSection = Field(default_factory=RunSection)
    """Name, seed, tags and notes."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    """Architecture and initial weights."""
    data: DataSpec = Field(default_factory=DataSpec)
    """Dataset and tokenizer."""
    train: TrainSpec = Field(default_factory=TrainSpec)
    """Training loop, checkpoints and dynamics."""
    extract: ExtractSpec = Field(default_factory=ExtractSpec)
    """Hidden-state extraction."""
    ot: OTSpec = Field(default_factory=OTSpec)
    """Optimal-transport drift and change points."""
    sae: SAESpec = Field(default_factory=SAESpec)
    """Sparse autoencoders."""
    detect: DetectSpec = Field(default_factory=DetectSpec)
    """Hallucination detection."""
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    """Metrics and report."""
    hmm: HMMSpec = Field(default_factory=HMMSpec)
    """Training-phase HMM."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Cluster resources per stage."""
    custom: dict[str, Any] = Field(default_factory=dict)
    """Free-form values (any keys), shown as columns by `driftlab runs`."""

    @model_validator(mode="before")
    @classmethod
    def _fill(cls, data: Any) -> Any:
        """Empty sections mean defaults; section seeds left out follow run.seed."""
        if not isinstance(data, dict):
            return data
        data = {k: ({} if v is None and k in SECTIONS else v) for k, v in data.items()}
        run = data.get("run", {})
        # An invalid run.seed is reported once, at run.seed, not again in every section.
        run_seed = _as_seed(run.get("seed")) if isinstance(run, dict) else None
        for name in SEEDED_SECTIONS:
            section = data.get(name, {})
            if isinstance(section, dict) and section.get("seed") is None:
                section = {k: v for k, v in section.items() if k != "seed"}
                if run_seed is not None:
                    section["seed"] = run_seed
                data[name] = section
        return data

    @field_validator("custom")
    @classmethod
    def _plain_custom(cls, value: dict[str, Any]) -> dict[str, Any]:
        plain: dict[str, Any] = _plain(value, "")
        return plain

    @model_validator(mode="after")
    def _check(self) -> Self:
        """Checks that span sections, each pointing at the key to change."""
        sizes = self.model.resolved_sizes()
        if self.data.max_length > sizes.n_positions:
            raise problem(
                f"{self.data.max_length} exceeds the model's n_positions ({sizes.n_positions}); "
                "lower it or raise model.n_positions",
                "data.max_length",
            )
        for name in ("sae", "detect"):
            layers = getattr(self, name).layers
            if layers != "all" and layers[-1] > sizes.n_layer:
                raise problem(
                    f"layer {layers[-1]} does not exist: hidden-state layers are 0..{sizes.n_layer} "
                    f"(0 is the embeddings, {sizes.n_layer} the last block)",
                    f"{name}.layers",
                )
        if self.detect.layers != "all" and self.sae.layers != "all":
            missing = sorted(set(self.detect.layers) - set(self.sae.layers))
            if missing:
                raise problem(
                    f"layer {missing[0]} has no SAE; add it to sae.layers or drop it here",
                    "detect.layers",
                )
        d_sae = self.sae.expansion * sizes.n_embd
        if self.sae.k is not None and self.sae.k > d_sae:
            raise problem(
                f"{self.sae.k} exceeds the SAE's {d_sae} features (sae.expansion * n_embd)",
                "sae.k",
            )
        if self.ot.pca_components is not None and self.ot.pca_components > sizes.n_embd:
            raise problem(
                f"{self.ot.pca_components} exceeds the model's n_embd ({sizes.n_embd}); lower it "
                "or set null to keep every dimension",
                "ot.pca_components",
            )
        last = self.train.steps
        if last is not None:
            if self.sae.step is not None and self.sae.step > last:
                raise problem(
                    f"{self.sae.step} is after the last training step (train.steps {last})",
                    "sae.step",
                )
            if self.extract.steps != "all" and self.extract.steps[-1] > last:
                raise problem(
                    f"{self.extract.steps[-1]} is after the last training step (train.steps {last})",
                    "extract.steps",
                )
        return self


#: `run.seed`'s own validation, so the sections follow exactly the seed the field will hold.
_SEED = TypeAdapter(Seed)


def _as_seed(value: Any) -> int | None:
    """`value` as the seed pydantic will make of it (`"7"`, `"+7"` and `7.0` are 7), else None."""
    try:
        seed: int = _SEED.validate_python(value)
    except ValidationError:
        return None
    return seed


def model_sizes(spec: RunSpec) -> ModelSizes:
    """(n_layer, n_head, n_embd, n_positions) of the run's model, presets resolved."""
    return spec.model.resolved_sizes()


def sae_layers(spec: RunSpec) -> list[int]:
    """Hidden-state layers (0 = embeddings .. n_layer) that `sae.layers` selects."""
    chosen = spec.sae.layers
    return list(range(model_sizes(spec).n_layer + 1)) if chosen == "all" else list(chosen)


def spec_to_dict(spec: RunSpec) -> dict[str, Any]:
    """The resolved spec as plain JSON-able data, sections in `SECTIONS` order."""
    return spec.model_dump(mode="json")


def section_digest(spec: RunSpec, section: str) -> str:
    """sha256 of one section's canonical JSON: the same in every process and key order.

    Stages store it in their DONE marker to tell whether cached outputs still match.
    """
    if section not in SECTIONS:
        raise ValueError(f"unknown spec section {section!r}; sections are {', '.join(SECTIONS)}")
    canonical = json.dumps(
        spec_to_dict(spec)[section],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def flatten_spec(spec: RunSpec | Mapping[str, Any]) -> dict[str, Any]:
    """Dotted path -> leaf value (lists stay whole values), e.g. {"train.learning_rate": 1e-3}.

    Accepts raw mappings too, so the run registry can read specs of older versions.
    """
    data = spec_to_dict(spec) if isinstance(spec, RunSpec) else spec
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value

    walk("", data)
    return flat
