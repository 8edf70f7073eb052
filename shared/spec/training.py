"""The sections that say what is trained: the run's identity, the model, the data, the loop."""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal, NamedTuple, Self

from pydantic import Field, field_validator, model_validator

from shared.spec.fields import Beta, Float, Int, Section, Seed, problem, show_value

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

#: Training length when a spec gives neither `train.steps` nor `train.epochs`.
DEFAULT_TRAIN_STEPS = 200


class RunSection(Section):
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
        raise problem(
            "must be lower-case letters, digits and '-', start and end with a letter or "
            f"digit, and have at most {MAX_RUN_NAME} characters (it becomes a Kubernetes "
            f"name); got {show_value(value)}{hint}"
        )

    @field_validator("tags", mode="before")
    @classmethod
    def _tags_as_text(cls, value: Any) -> Any:
        """`lr: 0.001` or `baseline: true` are tags too; they are kept as text."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            return value
        return {k: show_value(v) if isinstance(v, int | float) else v for k, v in value.items()}


class ModelSpec(Section):
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
                    raise problem(
                        f"is required with arch: custom (or pick a preset: {', '.join(MODEL_PRESETS)})",
                        name,
                    )
        sizes = self.resolved_sizes()
        if sizes.n_embd % sizes.n_head:
            raise problem(
                f"n_embd {sizes.n_embd} is not divisible by n_head {sizes.n_head}; "
                "each head needs n_embd / n_head dimensions",
                "n_embd" if self.n_embd is not None else "n_head",
            )
        if self.init == "pretrained" and self.pretrained is None:
            raise problem(
                "init: pretrained needs the weights to load: set model.pretrained to a "
                "Hugging Face name (e.g. gpt2-medium) or a local folder",
                "pretrained",
            )
        return self


class DataSpec(Section):
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
    facts_unknown: Literal["novel", "confusable"] = "novel"
    """facts: what the never-seen lands look like. `novel`: names unlike any known land's,
    so a model is unsure about them and predictive entropy alone spots invented answers;
    `confusable`: each is a known land's name with one letter changed, so a model answers
    with the known twin's fact, confidently and wrongly (the hard case for detectors)."""
    facts_spellings: Int = Field(default=1, ge=1, le=4)
    """facts: how many spellings each known land is trained under, its name and variants
    with one vowel changed, every fact stated under each. Above 1 a model learns that a
    changed vowel names the same land, so a `confusable` land (a spelling it never saw)
    gets its twin's fact with confidence: predictive entropy then fails, and only the
    model's insides can tell a seen name from an unseen one."""
    seed: Seed = 0
    """Seed for generating, shuffling and splitting the data (follows run.seed)."""

    @field_validator("tokenizer")
    @classmethod
    def _check_tokenizer(cls, value: str) -> str:
        """A bare word other than a built-in name is almost surely a typo, not a folder."""
        if value in TOKENIZERS or "/" in value or value.startswith((".", "~")):
            return value
        hint = difflib.get_close_matches(value, TOKENIZERS, n=1)
        raise problem(
            f"must be byte, numbers, gpt2 or a path to a tokenizer folder (write ./{value} for a "
            f"folder here); got {show_value(value)}"
            + (f" (did you mean {hint[0]}?)" if hint else "")
        )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.path is not None and self.hub_name is not None:
            raise problem("set data.path or data.hub_name, not both", "hub_name")
        generated = self.dataset in ("arithmetic", "modular", "facts")
        for name in ("path", "hub_name"):
            if generated and getattr(self, name) is not None:
                raise problem(
                    f"dataset {self.dataset} is generated and reads nothing; remove data.{name} "
                    "or pick gsm8k, tinystories or text",
                    name,
                )
        if self.dataset == "text" and self.path is None:
            raise problem("dataset text needs data.path: a .txt/.jsonl file or a folder", "path")
        return self


class TrainSpec(Section):
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
            raise problem("set train.steps or train.epochs, not both", "epochs")
        if data.get("epochs") is None and data.get("steps") is None:
            data = {**data, "steps": DEFAULT_TRAIN_STEPS}
        return data

    @field_validator("betas", mode="before")
    @classmethod
    def _two_betas(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise problem(f"expected a list of two numbers [beta1, beta2], got {show_value(value)}")
        return value

    @field_validator("resume_from")
    @classmethod
    def _check_resume(cls, value: str | None) -> str | None:
        if value is not None and not _RESUME_RE.match(value):
            raise problem(
                "must be RUN_ID, RUN_ID:STEP or runs/RUN_ID/train/checkpoints/step-NNNNNN; "
                f"got {show_value(value)}"
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
