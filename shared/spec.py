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

import datetime as dt
import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Self, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from shared.errors import SpecError

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
    "StageResources",
    "TrainSpec",
    "apply_overrides",
    "flatten_spec",
    "load_spec",
    "model_sizes",
    "parse_overrides",
    "parse_spec",
    "section_digest",
    "spec_from_dict",
    "spec_to_dict",
    "spec_to_yaml",
]

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
_SEEDED_SECTIONS = ("data", "train", "extract", "ot", "sae", "detect", "evaluate", "hmm")

#: numpy's RandomState refuses larger seeds; catching it here beats a crash mid-run.
MAX_SEED = 2**32 - 1
#: The built-in tokenizers' names (data.tokenizer may also be a folder).
TOKENIZERS = ["byte", "numbers", "gpt2"]

#: A run id is `<name>-<yyyymmdd-hhmmss>-<6 hex>` of at most 63 characters (shared/layout.py),
#: so the name gets 63 - 23; a name that fits is used verbatim, never silently folded.
MAX_RUN_NAME = 40
_RUN_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_RUN_ID = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_RESUME_RE = re.compile(
    rf"^(?:(?P<run>{_RUN_ID})(?::(?P<step>\d+))?"
    rf"|runs/(?P<key_run>{_RUN_ID})/train/checkpoints/step-(?P<key_step>\d{{6,}})/?)$"
)

# Kubernetes quantities: CPU as cores or millicores, memory as bytes with an SI or binary
# suffix. Exponent forms (1e3) are legal there but never what a person means in a spec.
_CPU_RE = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)m?$")
_MEMORY_RE = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)(?:[KMGTPE]i|[kMGTPE])?$")


class ModelSizes(NamedTuple):
    """The shape of a GPT-2-style model, as Hugging Face's GPT2Config names it."""

    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int


#: `model.arch` presets: Hugging Face GPT2Config sizes, plus `tiny`, small enough that the
#: whole pipeline runs on a 2-core CPU in a minute or two.
MODEL_PRESETS: dict[str, ModelSizes] = {
    "tiny": ModelSizes(n_layer=2, n_head=2, n_embd=64, n_positions=128),
    "gpt2": ModelSizes(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "gpt2-medium": ModelSizes(n_layer=24, n_head=16, n_embd=1024, n_positions=1024),
    "gpt2-large": ModelSizes(n_layer=36, n_head=20, n_embd=1280, n_positions=1024),
    "gpt2-xl": ModelSizes(n_layer=48, n_head=25, n_embd=1600, n_positions=1024),
}
#: `arch: custom` takes n_layer/n_head/n_embd from the spec; positions default as in GPT-2.
CUSTOM_N_POSITIONS = 1024

#: Training-dynamics metrics the trainer writes to each checkpoint's dynamics.json (the
#: visualizing-training set, after Hu et al.); `hmm.features` picks among these names.
DynamicsFeature = Literal[
    "l1",
    "l2",
    "code_sparsity",
    "w_mean",
    "w_median",
    "w_var",
    "b_mean",
    "b_median",
    "b_var",
    "trace",
    "spectral",
    "computational_sparsity",
    "sv_mean",
    "sv_var",
]
DYNAMICS_FEATURES: tuple[str, ...] = get_args(DynamicsFeature)
_DEFAULT_HMM_FEATURES: list[DynamicsFeature] = [
    "l1",
    "l2",
    "code_sparsity",
    "trace",
    "spectral",
    "computational_sparsity",
    "sv_mean",
    "sv_var",
]

#: Training length when a spec gives neither `train.steps` nor `train.epochs`.
DEFAULT_TRAIN_STEPS = 200
#: SAE training length when a spec gives neither `sae.epochs` nor `sae.tokens`.
DEFAULT_SAE_TOKENS = 262_144


# -- validation building blocks ----------------------------------------------------------


def _problem(message: str, field: str = "") -> PydanticCustomError:
    """A validation error whose text is ours; `field` is a dotted path below the error's loc.

    Model-level checks raise at the model's location, so `field` says which key to fix.
    """
    return PydanticCustomError("driftlab_spec", "{message}", {"message": message, "field": field})


def _show(value: Any) -> str:
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


def _no_bool_int(value: Any) -> Any:
    """YAML `true` must not pass as the integer 1 (pydantic's lax mode would allow it)."""
    if isinstance(value, bool):
        raise _problem(f"expected an integer, got {_show(value)}")
    return value


def _no_bool_float(value: Any) -> Any:
    """YAML `true` must not pass as the number 1.0 (pydantic's lax mode would allow it)."""
    if isinstance(value, bool):
        raise _problem(f"expected a number, got {_show(value)}")
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
        raise _problem(
            f"must be all or a non-empty list of non-negative integers, got {_show(value)}"
        )
    return sorted(set(value))


Selection = Annotated[Literal["all"] | list[int], BeforeValidator(_selection)]


def _cpu_quantity(value: Any) -> Any:
    """A Kubernetes CPU quantity ("2", "0.5", "500m"); YAML numbers are accepted as such."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not _CPU_RE.match(value) or _quantity_is_zero(value):
        raise _problem(
            f"must be a positive Kubernetes CPU quantity such as 2, 0.5 or 500m; got {_show(value)}"
        )
    return value


def _memory_quantity(value: Any) -> Any:
    """A Kubernetes memory quantity ("4Gi", "512Mi", "1G"); plain numbers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and re.fullmatch(r"\d+(?:\.\d*)?m", value):
        raise _problem(
            f"must be a Kubernetes memory quantity; {value!r} means milli-bytes "
            f"(did you mean {value[:-1]}Mi?)"
        )
    if not isinstance(value, str) or not _MEMORY_RE.match(value) or _quantity_is_zero(value):
        raise _problem(
            "must be a positive Kubernetes memory quantity such as 4Gi, 512Mi or 1G; "
            f"got {_show(value)}"
        )
    return value


def _quantity_is_zero(value: str) -> bool:
    return float(value.rstrip("mkKMGTPEi") or "0") == 0


def _plain(value: Any, path: str, depth: int = 0) -> Any:
    """`value` as plain JSON-able data; dates become ISO strings.

    `custom` accepts anything a person can write, but it is digested and shown as
    columns, so it must survive JSON: YAML dates are turned into strings, anything else
    that is not JSON (sets, binary) is refused.
    """
    if depth > 32:
        raise _problem("is nested too deeply (more than 32 levels)", path)
    if isinstance(value, float) and not math.isfinite(value):
        raise _problem(f"must be a finite number, got {value}", path)
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
                raise _problem(f"keys must be strings, got {_show(k)}", path)
            out[k] = _plain(v, f"{path}.{k}" if path else k, depth + 1)
        return out
    raise _problem(
        f"must be a string, number, boolean, null, list or mapping; got {type(value).__name__}",
        path,
    )


class _Section(BaseModel):
    """Common configuration: unknown keys are errors, values are immutable and finite."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
    )


# -- sections ----------------------------------------------------------------------------


class RunSection(_Section):
    """Identity of the run: how it is named, seeded and found again in `driftlab runs`."""

    name: str = "driftlab"
    """Run name, the first part of the run id: lower-case letters, digits and '-'."""
    seed: Seed = 0
    """Master seed; every section `seed` left out follows it."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Free-form labels (e.g. `sweep: lr-grid`), filterable in `driftlab runs`."""
    notes: str = ""
    """Free text for the person reading the run later."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if len(value) <= MAX_RUN_NAME and _RUN_NAME_RE.match(value):
            return value
        folded = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", value.lower()))
        folded = folded[:MAX_RUN_NAME].strip("-")
        hint = f" (did you mean {folded}?)" if folded and folded != value else ""
        raise _problem(
            "must be lower-case letters, digits and '-', start and end with a letter or "
            f"digit, and have at most {MAX_RUN_NAME} characters (it becomes a Kubernetes "
            f"name); got {_show(value)}{hint}"
        )

    @field_validator("tags", mode="before")
    @classmethod
    def _tags_as_text(cls, value: Any) -> Any:
        """`lr: 0.001` or `baseline: true` are tags too; they are kept as text."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            return value
        return {k: _show(v) if isinstance(v, int | float) else v for k, v in value.items()}


class ModelSpec(_Section):
    """The transformer: a GPT-2 preset or explicit sizes, random or pretrained weights."""

    arch: Literal["tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "custom"] = "tiny"
    """Size preset; explicit n_layer/n_head/n_embd/n_positions override it (`custom`: no preset)."""
    n_layer: Int | None = Field(default=None, gt=0)
    """Transformer blocks; null takes the preset's."""
    n_head: Int | None = Field(default=None, gt=0)
    """Attention heads per block; null takes the preset's."""
    n_embd: Int | None = Field(default=None, gt=0)
    """Residual stream width (d_model); null takes the preset's."""
    n_positions: Int | None = Field(default=None, gt=0)
    """Context length; null takes the preset's (1024 for `custom`)."""
    vocab_size: Int | None = Field(default=None, gt=0)
    """Vocabulary size; null takes the tokenizer's."""
    dropout: Float = Field(default=0.0, ge=0, lt=1)
    """Dropout on embeddings, attention and residual paths."""
    init: Literal["random", "pretrained"] = "random"
    """Start from random weights or from `pretrained` (fine-tuning or analysis-only runs)."""
    pretrained: str | None = Field(default=None, min_length=1)
    """Hugging Face model name (e.g. gpt2-medium) or local folder; needed by `init: pretrained`."""
    init_std: Float = Field(default=0.02, gt=0)
    """Standard deviation of the normal weight init (GPT-2's initializer_range)."""
    init_mean: Float = 0.0
    """Mean of the normal weight init."""

    def resolved_sizes(self) -> ModelSizes:
        """The sizes in effect: explicit fields first, then the preset's."""
        base = MODEL_PRESETS.get(self.arch, ModelSizes(0, 0, 0, CUSTOM_N_POSITIONS))
        return ModelSizes(
            n_layer=self.n_layer or base.n_layer,
            n_head=self.n_head or base.n_head,
            n_embd=self.n_embd or base.n_embd,
            n_positions=self.n_positions or base.n_positions,
        )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.arch == "custom":
            for name in ("n_layer", "n_head", "n_embd"):
                if getattr(self, name) is None:
                    raise _problem(
                        f"is required with arch: custom (or pick a preset: {', '.join(MODEL_PRESETS)})",
                        name,
                    )
        sizes = self.resolved_sizes()
        if sizes.n_embd % sizes.n_head:
            raise _problem(
                f"n_embd {sizes.n_embd} is not divisible by n_head {sizes.n_head}; "
                "each head needs n_embd / n_head dimensions",
                "n_embd" if self.n_embd is not None else "n_head",
            )
        if self.init == "pretrained" and self.pretrained is None:
            raise _problem(
                "init: pretrained needs the weights to load: set model.pretrained to a "
                "Hugging Face name (e.g. gpt2-medium) or a local folder",
                "pretrained",
            )
        return self


class DataSpec(_Section):
    """What the model reads: a generated task or a text corpus, and how it is tokenised."""

    dataset: Literal["arithmetic", "modular", "facts", "gsm8k", "tinystories", "text"] = (
        "arithmetic"
    )
    """Generated (arithmetic, modular, facts: a fictional knowledge base) or a corpus."""
    path: str | None = Field(default=None, min_length=1)
    """Local file or folder to read a corpus from (required by `text`)."""
    hub_name: str | None = Field(default=None, min_length=1)
    """Hugging Face dataset name for gsm8k/tinystories; null uses the loader's default."""
    tokenizer: str = "byte"
    """`byte` (256 symbols), `numbers` (bytes plus one token per whole number 0..999, the
    grokking papers' one-token operands and answers), `gpt2` (BPE), or a path to a folder
    with vocab.json + merges.txt."""
    max_length: Int = Field(default=64, gt=0)
    """Tokens per sequence (longer samples are truncated); at most model n_positions."""
    loss_on: Literal["all", "answer"] = "all"
    """Tokens the training loss is taken on: every one, or only each answer and its eos (as
    in the grokking papers; needs a task with answers). Eval loss follows it."""
    train_samples: Int = Field(default=2000, gt=0)
    """Training sequences to draw (generated tasks) or keep (corpora)."""
    eval_samples: Int = Field(default=200, gt=0)
    """Held-out sequences for eval metrics at each checkpoint."""
    modular_p: Int = Field(default=113, ge=2)
    """Modulus of the `modular` task (a + b mod p), as in the grokking papers."""
    train_fraction: Float = Field(default=0.3, gt=0, lt=1)
    """Share of all p*p `modular` pairs used for training; the rest is held out."""
    facts_entities: Int = Field(default=200, gt=0)
    """Fictional entities in the `facts` knowledge base."""
    facts_known_fraction: Float = Field(default=0.5, gt=0, lt=1)
    """Share of `facts` entities seen in training; questions on the rest invite made-up answers."""
    facts_asked: bool = False
    """facts: also train on the known lands' eval questions (recall of trained facts, the
    GhostTrack setting); false holds them out, so a known answer must be inferred from its
    statement, which small models trained from scratch rarely manage."""
    seed: Seed = 0
    """Seed for generating, shuffling and splitting the data (follows run.seed)."""

    @field_validator("tokenizer")
    @classmethod
    def _check_tokenizer(cls, value: str) -> str:
        """A bare word other than a built-in name is almost surely a typo, not a folder."""
        if value in TOKENIZERS or "/" in value or value.startswith((".", "~")):
            return value
        hint = difflib.get_close_matches(value, TOKENIZERS, n=1)
        raise _problem(
            f"must be byte, numbers, gpt2 or a path to a tokenizer folder (write ./{value} for a "
            f"folder here); got {_show(value)}" + (f" (did you mean {hint[0]}?)" if hint else "")
        )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.path is not None and self.hub_name is not None:
            raise _problem("set data.path or data.hub_name, not both", "hub_name")
        generated = self.dataset in ("arithmetic", "modular", "facts")
        for name in ("path", "hub_name"):
            if generated and getattr(self, name) is not None:
                raise _problem(
                    f"dataset {self.dataset} is generated and reads nothing; remove data.{name} "
                    "or pick gsm8k, tinystories or text",
                    name,
                )
        if self.dataset == "text" and self.path is None:
            raise _problem("dataset text needs data.path: a .txt/.jsonl file or a folder", "path")
        return self


class TrainSpec(_Section):
    """The training loop: length, optimiser, schedule, checkpoints and dynamics."""

    steps: Int | None = Field(default=None, ge=0)
    """Optimiser steps (default 200 when epochs is not set); 0 keeps only the step-0 checkpoint."""
    epochs: Float | None = Field(default=None, gt=0)
    """Passes over the training set, instead of steps."""
    batch_size: Int = Field(default=16, gt=0)
    """Sequences per micro-batch (per device)."""
    grad_accum: Int = Field(default=1, ge=1)
    """Micro-batches accumulated per optimiser step."""
    learning_rate: Float = Field(default=1e-3, gt=0)
    """Peak AdamW learning rate."""
    weight_decay: Float = Field(default=0.1, ge=0)
    """AdamW decoupled weight decay (grokking runs raise it to ~1)."""
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    warmup_steps: Int = Field(default=10, ge=0)
    """Linear warm-up steps from 0 to learning_rate."""
    min_lr_ratio: Float = Field(default=0.1, ge=0, le=1)
    """Final learning rate of cosine/linear decay, as a share of learning_rate."""
    clip_grad: Float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this; null disables clipping."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision; auto is bf16 on GPUs that support it, else fp32."""
    strategy: Literal["single", "ddp", "fsdp"] = "single"
    """One device, or data-parallel over all GPUs of the pod (ddp, fsdp)."""
    compile: bool = False
    """torch.compile the model (faster on GPU, slow to start)."""
    checkpoint_every: Int = Field(default=20, gt=0)
    """Steps between checkpoints (step 0 and the last step are always saved)."""
    dynamics_every: Int = Field(default=20, gt=0)
    """Steps between weight/gradient dynamics measurements."""
    log_every: Int = Field(default=10, gt=0)
    """Steps between lines of train/metrics.jsonl."""
    save_gradients: bool = False
    """Also store each checkpoint's gradients (grads.safetensors)."""
    resume_from: str | None = None
    """Start from another run's checkpoint: RUN_ID, RUN_ID:STEP or its store key."""
    seed: Seed = 0
    """Seed for init, data order and dropout (follows run.seed)."""

    @model_validator(mode="before")
    @classmethod
    def _steps_or_epochs(cls, data: Any) -> Any:
        """Exactly one training length; steps by default, so a spec may name neither."""
        if not isinstance(data, dict):
            return data
        if data.get("steps") is not None and data.get("epochs") is not None:
            raise _problem("set train.steps or train.epochs, not both", "epochs")
        if data.get("epochs") is None and data.get("steps") is None:
            data = {**data, "steps": DEFAULT_TRAIN_STEPS}
        return data

    @field_validator("betas", mode="before")
    @classmethod
    def _two_betas(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise _problem(f"expected a list of two numbers [beta1, beta2], got {_show(value)}")
        return value

    @field_validator("resume_from")
    @classmethod
    def _check_resume(cls, value: str | None) -> str | None:
        if value is not None and not _RESUME_RE.match(value):
            raise _problem(
                "must be RUN_ID, RUN_ID:STEP or runs/RUN_ID/train/checkpoints/step-NNNNNN; "
                f"got {_show(value)}"
            )
        return value

    def resume_point(self) -> tuple[str, int | None] | None:
        """(run id, step or None for the latest) named by `resume_from`, or None."""
        if self.resume_from is None:
            return None
        match = _RESUME_RE.match(self.resume_from)
        assert match is not None  # checked by the validator
        run_id = match["run"] or match["key_run"]
        step = match["step"] or match["key_step"]
        return run_id, int(step) if step is not None else None


class ExtractSpec(_Section):
    """Hidden states: which checkpoints, which tokens of the fixed probe set, stored how."""

    steps: Selection = "all"
    """Checkpoint steps to extract: all, or a list of steps."""
    probe_samples: Int = Field(default=64, gt=0)
    """Sequences in the fixed probe set, the same for every checkpoint."""
    token_policy: Literal["all", "last", "answer", "random_k"] = "all"
    """Which positions of a probe sequence to keep."""
    random_k: Int = Field(default=8, gt=0)
    """Positions kept per sequence by token_policy random_k."""
    max_tokens_per_layer: Int | None = Field(default=4096, gt=0)
    """Cap on stored tokens per layer and checkpoint (subsampled, seeded); null: no cap."""
    sites: list[Literal["attn_out", "mlp_out", "resid_mid"]] = Field(default_factory=list)
    """Sites beyond the residual stream after each block (always extracted)."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of hidden states."""
    batch_size: Int = Field(default=16, gt=0)
    """Probe sequences per forward pass."""
    seed: Seed = 0
    """Seed for the probe set and token subsampling (follows run.seed)."""

    @field_validator("sites")
    @classmethod
    def _unique_sites(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class OTSpec(_Section):
    """Representation drift by optimal transport between hidden-state clouds."""

    method: Literal["sinkhorn", "emd", "sliced"] = "sinkhorn"
    """Entropic OT (sinkhorn), exact OT (emd) or sliced Wasserstein."""
    reg: Float = Field(default=0.05, gt=0)
    """Entropic regularisation epsilon of sinkhorn."""
    scaling: bool = True
    """Anneal epsilon from large to `reg` (epsilon scaling): faster and stabler sinkhorn."""
    max_iter: Int = Field(default=200, gt=0)
    """Sinkhorn iterations per OT problem; a problem still above `tol` after them is finished by Newton's method in float64."""
    tol: Float = Field(default=1e-5, gt=0)
    """Sinkhorn's stopping tolerance on the marginal error (L1: mass in the wrong place, 0..2)."""
    rtol: Float = Field(default=1e-3, gt=0)
    """Relative accuracy of every sinkhorn drift value: where the error estimated from `tol` is larger, its OT problems are polished in float64 (Newton)."""
    n_points: Int = Field(default=256, gt=1)
    """Points sampled from each hidden-state cloud."""
    pca_components: Int | None = Field(default=32, gt=0)
    """Project onto this many principal components first; null keeps all dimensions."""
    n_projections: Int = Field(default=128, gt=0)
    """Random directions of the sliced method."""
    bootstrap: Int = Field(default=20, ge=0)
    """Bootstrap resamples for confidence intervals; 0 disables them."""
    permutations: Int = Field(default=20, ge=0)
    """Random splits of one checkpoint's token cloud into two disjoint halves (the n drift tokens pooled with up to n more probe tokens): the noise baseline and p-value of each step's drift; 0 disables them."""
    change_penalty: Float | None = Field(default=None, gt=0)
    """Penalty of the change-point search; null picks one from the data (BIC-like)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to solve (the stage's --device flag overrides it)."""
    dtype: Literal["float32", "float64"] = "float32"
    """Solver precision."""
    seed: Seed = 0
    """Seed for sampling, projections and bootstrap (follows run.seed)."""


class SAESpec(_Section):
    """Sparse autoencoders on hidden states, one per layer."""

    arch: Literal["jumprelu", "topk", "relu"] = "jumprelu"
    """JumpReLU (learned thresholds, L0 penalty), TopK (k active) or ReLU (L1 penalty)."""
    layers: Selection = "all"
    """Hidden-state layers (0 = embeddings .. n_layer) to train an SAE on."""
    step: Int | None = Field(default=None, ge=0)
    """Checkpoint step whose hidden states train the SAEs; null: the last one."""
    source: Literal["stream", "probe"] = "stream"
    """Training activations: `stream` runs the checkpoint over the run's training data through a shuffled buffer; `probe` reads the extracted probe tokens (a few thousand at most)."""
    expansion: Int = Field(default=5, gt=0)
    """Features per input dimension (d_sae = expansion * n_embd); 5 as GhostTrack (1024 -> 5120)."""
    k: Int | None = Field(default=None, gt=0)
    """Active features per token; required by (and only used by) arch topk."""
    sparsity_loss: Literal["step", "tanh", "target_l0"] = "tanh"
    """JumpReLU sparsity penalty: its tanh relaxation of L0 (reaches the encoder, so it sparsifies within a short budget), L0 via step (only the thresholds learn from it, slowly), or distance to target_l0."""
    l0_coeff: Float = Field(default=3e-3, ge=0)
    """Weight of the JumpReLU sparsity penalty; inputs have unit mean squared norm, so 3e-3 prices one strongly active feature at 0.3% of their power."""
    target_l0: Float | None = Field(default=None, gt=0)
    """Active features per token aimed at by sparsity_loss target_l0."""
    l1_coeff: Float = Field(default=3e-2, ge=0)
    """Weight of the decoder-norm-weighted L1 penalty of arch relu (inputs of unit mean squared norm)."""
    bandwidth: Float = Field(default=0.05, gt=0)
    """Width of the rectangle kernel of JumpReLU's threshold pseudo-gradient (SAELens: 0.05)."""
    init_threshold: Float = Field(default=0.01, gt=0)
    """Initial JumpReLU threshold (SAELens: 0.01)."""
    tanh_scale: Float = Field(default=4.0, gt=0)
    """Scale inside the tanh of sparsity_loss tanh."""
    aux_k_coeff: Float = Field(default=1 / 32, ge=0)
    """Weight of TopK's auxiliary loss that revives dead features (Gao et al.: 1/32)."""
    pre_act_coeff: Float = Field(default=0.0, ge=0)
    """Weight of JumpReLU's pre-activation loss Σ ReLU(θ − z) that revives dead features (Anthropic, January 2025); 0: off."""
    lr: Float = Field(default=1e-3, gt=0)
    """Adam learning rate."""
    batch_size: Int = Field(default=256, gt=0)
    """Tokens per batch."""
    epochs: Float | None = Field(default=None, gt=0)
    """Passes over the source's training tokens (the training set, or the probe's training share), instead of tokens."""
    tokens: Int | None = Field(default=None, gt=0)
    """Training tokens in total (default 262,144 when epochs is not set); a small training set is cycled in a new shuffled order each pass."""
    buffer_tokens: Int = Field(default=65_536, gt=0)
    """Source stream: activations in the shuffling buffer (at least 2 batches), half refilled at a time; a training set this small is computed once."""
    eval_tokens: Int = Field(default=2000, gt=0)
    """Source stream: held-out tokens (eval split) the metrics are measured on; fewer when the split has fewer."""
    warmup_steps: Int = Field(default=0, ge=0)
    """Learning-rate warm-up steps."""
    sparsity_warmup_steps: Int = Field(default=0, ge=0)
    """Steps over which the sparsity coefficient ramps up from 0."""
    holdout_fraction: Float = Field(default=0.1, ge=0, lt=1)
    """Source probe: share of the probe's sequences held out for the SAE's metrics."""
    compile: bool = False
    """torch.compile the SAE."""
    seed: Seed = 0
    """Seed for init, batching, the stream's order and the held-out choice (follows run.seed)."""

    @model_validator(mode="before")
    @classmethod
    def _epochs_or_tokens(cls, data: Any) -> Any:
        """Exactly one training length; tokens by default, so a spec may name neither."""
        if not isinstance(data, dict):
            return data
        if data.get("epochs") is not None and data.get("tokens") is not None:
            raise _problem("set sae.epochs or sae.tokens, not both", "tokens")
        if data.get("epochs") is None and data.get("tokens") is None:
            data = {**data, "tokens": DEFAULT_SAE_TOKENS}
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.buffer_tokens < 2 * self.batch_size:
            raise _problem(
                f"buffer_tokens {self.buffer_tokens} holds fewer than two batches of "
                f"{self.batch_size}; raise it to at least {2 * self.batch_size}",
                "buffer_tokens",
            )
        if self.arch == "topk" and self.k is None:
            raise _problem("arch topk needs k, the active features per token (e.g. 32)", "k")
        if self.sparsity_loss == "target_l0" and self.target_l0 is None:
            raise _problem(
                "sparsity_loss target_l0 needs target_l0, the active features per token to aim at",
                "target_l0",
            )
        return self


class DetectSpec(_Section):
    """Hallucination detection: generate answers, track SAE features, score them."""

    enabled: bool = True
    """Whether the workflow runs the detect stage. Off for tasks whose final model may answer
    every question right (or every one wrong), leaving a detector nothing to tell apart:
    modular arithmetic once grokked."""
    samples: Int = Field(default=64, gt=0)
    """Prompts to answer."""
    num_samples: Int = Field(default=1, gt=0)
    """Answers generated per prompt (more than 1 needs temperature > 0)."""
    temperature: Float = Field(default=0.0, ge=0)
    """Sampling temperature; 0 is greedy decoding."""
    top_k: Int | None = Field(default=None, gt=0)
    """Sample among the k most likely tokens only; null: no cut."""
    max_new_tokens: Int = Field(default=16, gt=0)
    """Tokens generated per answer at most."""
    layers: Selection = "all"
    """SAE layers whose features are tracked: all of sae.layers, or a subset."""
    test_fraction: Float = Field(default=0.3, gt=0, lt=1)
    """Share of prompts held out to test the detector."""
    hypotheses: Int = Field(default=16, gt=0)
    """Active SAE features per layer and generated token kept as that step's hypotheses (largest activations)."""
    link_cosine: Float = Field(default=0.5, gt=0, le=1)
    """Decoder-direction cosine at or above which features of adjacent tracked layers are linked."""
    bootstrap: Int = Field(default=1000, ge=0)
    """Bootstrap resamples for the AUROC confidence intervals in detect/metrics.json; 0: none."""
    seed: Seed = 0
    """Seed for prompt choice, sampling and the split (follows run.seed)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.num_samples > 1 and self.temperature == 0:
            raise _problem(
                "num_samples > 1 with temperature 0 repeats one greedy answer; "
                "set detect.temperature > 0 (e.g. 1.0)",
                "temperature",
            )
        return self


class EvaluateSpec(_Section):
    """Scores, confidence intervals and phase matching of the final report."""

    bootstrap: Int = Field(default=200, ge=0)
    """Bootstrap resamples for metric confidence intervals; 0 disables them."""
    threshold: Literal["f1", "youden", "fixed"] = "f1"
    """How the detector's decision threshold is chosen: best F1, Youden's J, or threshold_value."""
    threshold_value: Float = 0.5
    """Decision threshold used by threshold fixed."""
    phase_tolerance: Int = Field(default=1, ge=0)
    """Checkpoints by which a found phase boundary may miss a reference one and still match."""
    seed: Seed = 0
    """Seed for bootstrap resampling (follows run.seed)."""


class HMMSpec(_Section):
    """Latent training phases: Gaussian HMMs on training-dynamics features."""

    features: list[DynamicsFeature] = Field(
        default_factory=lambda: list(_DEFAULT_HMM_FEATURES), min_length=1
    )
    """Dynamics metrics (z-scored per run) the HMM observes."""
    max_components: Int = Field(default=8, ge=1)
    """Try 1..max_components hidden states."""
    cov_type: Literal["diag", "full", "spherical", "tied"] = "diag"
    """Covariance of each state's Gaussian."""
    restarts: Int = Field(default=5, ge=1)
    """Random restarts per number of states; the best log-likelihood is kept."""
    n_iter: Int = Field(default=100, ge=1)
    """EM iterations per fit."""
    select_by: Literal["bic", "aic", "loglik"] = "bic"
    """Criterion choosing the number of states (loglik: held-out log-likelihood)."""
    seed: Seed = 0
    """Seed for the restarts (follows run.seed)."""

    @field_validator("features")
    @classmethod
    def _unique_features(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class StageResources(_Section):
    """Kubernetes requests of one stage's pods (the cpu profile drops the GPUs)."""

    cpu: Annotated[str, BeforeValidator(_cpu_quantity)] = "500m"
    """CPU request: cores ("2", "0.5") or millicores ("500m")."""
    memory: Annotated[str, BeforeValidator(_memory_quantity)] = "1Gi"
    """Memory request, e.g. "4Gi" or "512Mi"."""
    gpus: Int = Field(default=0, ge=0)
    """GPUs (nvidia.com/gpu) per pod."""


def _stage_default(cpu: str, memory: str) -> Any:
    return Field(default_factory=lambda: StageResources(cpu=cpu, memory=memory))


class ResourcesSpec(_Section):
    """Per-stage pod resources on the cluster; the defaults fit a laptop kind cluster."""

    train: StageResources = _stage_default("1", "2Gi")
    """Trainer pod."""
    extract: StageResources = _stage_default("500m", "1Gi")
    """Each extractor pod (one per checkpoint)."""
    ot: StageResources = _stage_default("1", "2Gi")
    """OT pod."""
    sae: StageResources = _stage_default("500m", "1Gi")
    """Each SAE pod (one per layer)."""
    detect: StageResources = _stage_default("500m", "1Gi")
    """Detection pod."""
    evaluate: StageResources = _stage_default("500m", "1Gi")
    """Evaluator pod."""

    def for_stage(self, stage: str) -> StageResources:
        """The resources of `stage` (one of shared.layout.STAGES)."""
        if stage not in type(self).model_fields:
            raise KeyError(f"no resources for stage {stage!r}")
        value: StageResources = getattr(self, stage)
        return value


class RunSpec(_Section):
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
        for name in _SEEDED_SECTIONS:
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
            raise _problem(
                f"{self.data.max_length} exceeds the model's n_positions ({sizes.n_positions}); "
                "lower it or raise model.n_positions",
                "data.max_length",
            )
        for name in ("sae", "detect"):
            layers = getattr(self, name).layers
            if layers != "all" and layers[-1] > sizes.n_layer:
                raise _problem(
                    f"layer {layers[-1]} does not exist: hidden-state layers are 0..{sizes.n_layer} "
                    f"(0 is the embeddings, {sizes.n_layer} the last block)",
                    f"{name}.layers",
                )
        if self.detect.layers != "all" and self.sae.layers != "all":
            missing = sorted(set(self.detect.layers) - set(self.sae.layers))
            if missing:
                raise _problem(
                    f"layer {missing[0]} has no SAE; add it to sae.layers or drop it here",
                    "detect.layers",
                )
        d_sae = self.sae.expansion * sizes.n_embd
        if self.sae.k is not None and self.sae.k > d_sae:
            raise _problem(
                f"{self.sae.k} exceeds the SAE's {d_sae} features (sae.expansion * n_embd)",
                "sae.k",
            )
        if self.ot.pca_components is not None and self.ot.pca_components > sizes.n_embd:
            raise _problem(
                f"{self.ot.pca_components} exceeds the model's n_embd ({sizes.n_embd}); lower it "
                "or set null to keep every dimension",
                "ot.pca_components",
            )
        last = self.train.steps
        if last is not None:
            if self.sae.step is not None and self.sae.step > last:
                raise _problem(
                    f"{self.sae.step} is after the last training step (train.steps {last})",
                    "sae.step",
                )
            if self.extract.steps != "all" and self.extract.steps[-1] > last:
                raise _problem(
                    f"{self.extract.steps[-1]} is after the last training step (train.steps {last})",
                    "extract.steps",
                )
        return self


def _as_seed(value: Any) -> int | None:
    """`value` as the seed pydantic will make of it (`"7"` and `7.0` are 7), else None."""
    if (isinstance(value, str) and value.strip().isdigit()) or (
        isinstance(value, float) and value.is_integer()
    ):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEED:
        return value
    return None


def model_sizes(spec: RunSpec) -> ModelSizes:
    """(n_layer, n_head, n_embd, n_positions) of the run's model, presets resolved."""
    return spec.model.resolved_sizes()


def sae_layers(spec: RunSpec) -> list[int]:
    """Hidden-state layers (0 = embeddings .. n_layer) that `sae.layers` selects."""
    chosen = spec.sae.layers
    return list(range(model_sizes(spec).n_layer + 1)) if chosen == "all" else list(chosen)


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
        raise SpecError(f"{source}: {where}invalid YAML: {_one_line(problem)}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{source}: invalid YAML: {_one_line(str(err))}") from None
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


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _kind(value: Any) -> str:
    return "a list" if isinstance(value, list) else _show(value)


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
        return f"{_dotted(loc[:-2]) or 'top level'}: keys must be strings, got {_show(loc[-2])}"
    if kind == "invalid_key":
        return f"{_dotted(loc[:-1]) or 'top level'}: keys must be strings, got {_show(loc[-1])}"
    path = _dotted(loc) or "top level"
    if kind == "extra_forbidden":
        return f"{path}: {_unknown_key(loc[:-1], str(loc[-1]))}"
    if kind == "literal_error":
        options = _literal_options(_annotation_at(loc))
        if options:
            hint = difflib.get_close_matches(str(value), options, n=1)
            return f"{path}: must be one of {', '.join(options)}; got {_show(value)}" + (
                f" (did you mean {hint[0]}?)" if hint else ""
            )
        return f"{path}: must be {ctx.get('expected', 'one of the allowed values')}; got {_show(value)}"
    if kind in _EXPECTED:
        return f"{path}: expected {_EXPECTED[kind]}, got {_show(value)}"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        bound = ctx.get(key)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)  # pydantic reports `gt=0` of a float field as 0.0
        return f"{path}: must be {op} {bound}, got {_show(value)}"
    if kind == "finite_number":
        return f"{path}: must be a finite number, got {_show(value)}"
    if kind == "string_too_short":
        return f"{path}: must not be empty"
    if kind == "too_short":
        return f"{path}: needs at least {ctx.get('min_length')} item(s), got {_show(value)}"
    if kind == "too_long":
        return f"{path}: allows at most {ctx.get('max_length')} item(s), got {_show(value)}"
    return f"{path}: {_one_line(str(error.get('msg', 'is invalid')))}"


def _unwrap(annotation: Any) -> Any:
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
        annotation = _unwrap(annotation)
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
    return _unwrap(annotation)


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
        annotation = _unwrap(info.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for name in annotation.model_fields:
                homes.setdefault(name, []).append(f"{section}.{name}")
    return homes


def _unknown_key(parent: tuple[Any, ...], key: str) -> str:
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


def spec_to_dict(spec: RunSpec) -> dict[str, Any]:
    """The resolved spec as plain JSON-able data, sections in `SECTIONS` order."""
    return spec.model_dump(mode="json")


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
        _check_override_path(parts, path, source)
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
        for name in _SEEDED_SECTIONS:
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


def _check_override_path(parts: list[str], path: str, source: str) -> None:
    annotation: Any = RunSpec
    for depth, part in enumerate(parts):
        annotation = _unwrap(annotation)
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
                f"{_unknown_key(tuple(parts[:depth]), part)}"
            )
        annotation = field.annotation
