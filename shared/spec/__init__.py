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

Import from here; the modules behind it, each importing only those above it: ``fields``
(building blocks of the sections), ``training``, ``analysis`` and ``resources`` (the
sections), ``run_spec`` (``RunSpec`` and its plain forms), ``errors`` (pydantic errors as
one line), ``yaml_io`` (the YAML dialect, reading and writing) and ``overrides``.
"""

from __future__ import annotations

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
from shared.spec.fields import show_value
from shared.spec.overrides import apply_overrides, check_override_path, parse_overrides
from shared.spec.resources import ResourcesSpec, StageResources
from shared.spec.run_spec import (
    SECTIONS,
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
from shared.spec.yaml_io import load_spec, parse_spec, read_yaml_file, spec_from_dict, spec_to_yaml

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
