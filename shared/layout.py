"""Run identity and every store key of a run, in one place.

No stage spells a key by hand: each artifact (docs/ARCHITECTURE.md) has one function here, so the
layout can change in one file and a typo cannot silently create a second artifact.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime

from shared.errors import LayoutError

RUNS_PREFIX = "runs/"

_RUN_ID_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME_CLEAN_RE = re.compile(r"[^a-z0-9-]+")
_SHARD_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_RUN_ID = 63
# "-yyyymmdd-hhmmss-xxxxxx" is 23 characters; the name gets the rest.
_SUFFIX_LEN = 23


def validate_run_id(run_id: str) -> str:
    """Return `run_id` if it is a lower-case DNS-1123 label of at most 63 characters.

    Run ids become Kubernetes labels and workflow names and the first segment of every
    key, so anything else (upper case, dots, slashes, `..`) is rejected here, once.
    """
    if not isinstance(run_id, str) or not run_id:
        raise LayoutError("run id is empty: pass --run RUN_ID (see `driftlab runs`)")
    if len(run_id) > MAX_RUN_ID:
        raise LayoutError(
            f"run id {run_id!r} is {len(run_id)} characters; at most {MAX_RUN_ID} are allowed"
        )
    if not _RUN_ID_RE.match(run_id):
        raise LayoutError(
            f"run id {run_id!r} is not a lower-case DNS-1123 label "
            "(letters a-z, digits and '-', starting and ending with a letter or digit)"
        )
    return run_id


def new_run_id(name: str, now: datetime | None = None, token: str | None = None) -> str:
    """`<name>-<yyyymmdd-hhmmss>-<6 hex>` with `name` folded to DNS-1123 (lower case, '-').

    `now` and `token` (6 characters) fix the stamp, for renders that must not draw an id.
    """
    clean = _NAME_CLEAN_RE.sub("-", name.lower()).strip("-")
    clean = re.sub(r"-{2,}", "-", clean)[: MAX_RUN_ID - _SUFFIX_LEN].strip("-") or "run"
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return validate_run_id(f"{clean}-{stamp}-{token or secrets.token_hex(3)}")


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise LayoutError(f"checkpoint step must be a non-negative integer, got {step!r}")
    return step


def _check_layer(layer: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= 999:
        raise LayoutError(f"layer must be an integer in 0..999, got {layer!r}")
    return layer


def run_prefix(run_id: str) -> str:
    return f"{RUNS_PREFIX}{validate_run_id(run_id)}/"


# -- run level ---------------------------------------------------------------------------


def spec_key(run_id: str) -> str:
    return run_prefix(run_id) + "spec.yaml"


def lease_key(run_id: str) -> str:
    """Who writes the run now (shared/lease.py): one writer per run."""
    return run_prefix(run_id) + "lease.json"


def status_prefix(run_id: str) -> str:
    return run_prefix(run_id) + "status/"


def status_key(run_id: str, stage: str, shard: str | None = None) -> str:
    """`status/<stage>[-<shard>].json`: each fan-out shard owns its own object."""
    if not _SHARD_RE.match(stage):
        raise LayoutError(f"stage name {stage!r} is not a lower-case DNS-1123 label")
    if shard is not None and not _SHARD_RE.match(shard):
        raise LayoutError(f"shard {shard!r} is not a lower-case DNS-1123 label")
    suffix = f"-{shard}" if shard is not None else ""
    return f"{status_prefix(run_id)}{stage}{suffix}.json"


def annotation_key(run_id: str) -> str:
    """User-added custom metrics (`driftlab runs annotate`), shown as columns."""
    return status_key(run_id, "annotations")


# -- train -------------------------------------------------------------------------------


def train_metrics_key(run_id: str) -> str:
    return run_prefix(run_id) + "train/metrics.jsonl"


def train_dynamics_key(run_id: str) -> str:
    return run_prefix(run_id) + "train/dynamics.jsonl"


def train_done_key(run_id: str) -> str:
    """The trainer's own DONE marker: every checkpoint of the run is complete."""
    return run_prefix(run_id) + "train/DONE"


def checkpoints_prefix(run_id: str) -> str:
    return run_prefix(run_id) + "train/checkpoints/"


def checkpoint_prefix(run_id: str, step: int) -> str:
    return f"{checkpoints_prefix(run_id)}step-{_check_step(step):06d}/"


def checkpoint_model_key(run_id: str, step: int) -> str:
    return checkpoint_prefix(run_id, step) + "model.safetensors"


def checkpoint_config_key(run_id: str, step: int) -> str:
    return checkpoint_prefix(run_id, step) + "config.json"


def checkpoint_optim_key(run_id: str, step: int) -> str:
    return checkpoint_prefix(run_id, step) + "optim.safetensors"


def checkpoint_trainer_state_key(run_id: str, step: int) -> str:
    return checkpoint_prefix(run_id, step) + "trainer_state.json"


def checkpoint_grads_key(run_id: str, step: int) -> str:
    return checkpoint_prefix(run_id, step) + "grads.safetensors"


def checkpoint_dynamics_key(run_id: str, step: int) -> str:
    return checkpoint_prefix(run_id, step) + "dynamics.json"


def checkpoint_done_key(run_id: str, step: int) -> str:
    return checkpoint_prefix(run_id, step) + "DONE"


def parse_checkpoint_step(key: str) -> int | None:
    """The step of a key under `train/checkpoints/step-NNNNNN/`, or None."""
    m = re.search(r"/train/checkpoints/step-(\d{6,})/", key)
    return int(m.group(1)) if m else None


# -- extract -----------------------------------------------------------------------------


def probe_key(run_id: str) -> str:
    return run_prefix(run_id) + "extract/probe.safetensors"


def extract_step_prefix(run_id: str, step: int) -> str:
    return f"{run_prefix(run_id)}extract/step-{_check_step(step)}/"


def extract_layer_key(run_id: str, step: int, layer: int) -> str:
    return f"{extract_step_prefix(run_id, step)}layer-{_check_layer(layer):02d}.safetensors"


def extract_tokens_key(run_id: str, step: int) -> str:
    """Per-token model outputs (predictive entropy, next-token probability) of the probe."""
    return extract_step_prefix(run_id, step) + "tokens.safetensors"


def extract_index_key(run_id: str, step: int) -> str:
    """What one checkpoint's extraction holds: layers, sites, d_model, dtype, token count."""
    return extract_step_prefix(run_id, step) + "index.json"


def extract_done_key(run_id: str, step: int) -> str:
    return extract_step_prefix(run_id, step) + "DONE"


# -- ot ----------------------------------------------------------------------------------


def ot_prefix(run_id: str) -> str:
    return run_prefix(run_id) + "ot/"


def ot_drift_key(run_id: str) -> str:
    return ot_prefix(run_id) + "drift.safetensors"


def ot_phases_key(run_id: str) -> str:
    return ot_prefix(run_id) + "phases.json"


def ot_plot_key(run_id: str, name: str) -> str:
    return ot_prefix(run_id) + _file_name(name, ".png")


def ot_done_key(run_id: str) -> str:
    return ot_prefix(run_id) + "DONE"


# -- sae ---------------------------------------------------------------------------------


def sae_layer_prefix(run_id: str, layer: int) -> str:
    return f"{run_prefix(run_id)}sae/layer-{_check_layer(layer):02d}/"


def sae_weights_key(run_id: str, layer: int) -> str:
    return sae_layer_prefix(run_id, layer) + "sae.safetensors"


def sae_config_key(run_id: str, layer: int) -> str:
    return sae_layer_prefix(run_id, layer) + "sae.json"


def sae_done_key(run_id: str, layer: int) -> str:
    return sae_layer_prefix(run_id, layer) + "DONE"


# -- detect ------------------------------------------------------------------------------


def detect_prefix(run_id: str) -> str:
    return run_prefix(run_id) + "detect/"


def detect_generations_key(run_id: str) -> str:
    return detect_prefix(run_id) + "generations.jsonl"


def detect_tracks_key(run_id: str) -> str:
    return detect_prefix(run_id) + "tracks.safetensors"


def detect_scores_key(run_id: str) -> str:
    return detect_prefix(run_id) + "scores.jsonl"


def detect_metrics_key(run_id: str) -> str:
    return detect_prefix(run_id) + "metrics.json"


def detect_done_key(run_id: str) -> str:
    return detect_prefix(run_id) + "DONE"


# -- evaluate ----------------------------------------------------------------------------


def evaluate_prefix(run_id: str) -> str:
    return run_prefix(run_id) + "evaluate/"


def evaluate_report_json_key(run_id: str) -> str:
    return evaluate_prefix(run_id) + "report.json"


def evaluate_report_html_key(run_id: str) -> str:
    return evaluate_prefix(run_id) + "report.html"


def evaluate_plot_key(run_id: str, name: str) -> str:
    return evaluate_prefix(run_id) + _file_name(name, ".png")


def evaluate_hmm_key(run_id: str, name: str) -> str:
    return evaluate_prefix(run_id) + "hmm/" + _file_name(name)


def evaluate_done_key(run_id: str) -> str:
    return evaluate_prefix(run_id) + "DONE"


# -- across runs -------------------------------------------------------------------------


def comparison_key(run_ids: list[str], name: str) -> str:
    """`comparisons/<digest of the run ids>/<name>`: one folder per set of compared runs."""
    ids = [validate_run_id(r) for r in run_ids]
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
    return f"comparisons/{digest}/{_file_name(name)}"


def _file_name(name: str, suffix: str = "") -> str:
    """A single safe file name; `suffix` is appended when missing."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or ".." in name:
        raise LayoutError(f"artifact name {name!r} must be one plain file name")
    return name if not suffix or name.endswith(suffix) else name + suffix
