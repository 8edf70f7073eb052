"""Per-stage Kubernetes resources, with CPU and memory quantities checked as a person writes them."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from shared.spec.fields import Int, Section, problem, show_value

# Kubernetes quantities: CPU as cores or millicores, memory as bytes with an SI or binary
# suffix. Exponent forms (1e3) are legal there but never what a person means in a spec.
_CPU_RE = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)m?$")
_MEMORY_RE = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)(?:[KMGTPE]i|[kMGTPE])?$")


def _cpu_quantity(value: Any) -> Any:
    """A Kubernetes CPU quantity ("2", "0.5", "500m"); YAML numbers are accepted as such."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not _CPU_RE.match(value) or _quantity_is_zero(value):
        raise problem(
            f"must be a positive Kubernetes CPU quantity such as 2, 0.5 or 500m; got {show_value(value)}"
        )
    return value


def _memory_quantity(value: Any) -> Any:
    """A Kubernetes memory quantity ("4Gi", "512Mi", "1G"); plain numbers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and re.fullmatch(r"\d+(?:\.\d*)?m", value):
        raise problem(
            f"must be a Kubernetes memory quantity; {value!r} means milli-bytes "
            f"(did you mean {value[:-1]}Mi?)"
        )
    if not isinstance(value, str) or not _MEMORY_RE.match(value) or _quantity_is_zero(value):
        raise problem(
            "must be a positive Kubernetes memory quantity such as 4Gi, 512Mi or 1G; "
            f"got {show_value(value)}"
        )
    return value


def _quantity_is_zero(value: str) -> bool:
    return float(value.rstrip("mkKMGTPEi") or "0") == 0


class StageResources(Section):
    """Kubernetes requests of one stage's pods (the cpu profile drops the GPUs)."""

    cpu: Annotated[str, BeforeValidator(_cpu_quantity)] = "500m"
    """CPU request: cores ("2", "0.5") or millicores ("500m")."""
    memory: Annotated[str, BeforeValidator(_memory_quantity)] = "1Gi"
    """Memory request, e.g. "4Gi" or "512Mi"."""
    gpus: Int = Field(default=0, ge=0)
    """GPUs (nvidia.com/gpu) per pod."""
    parallelism: Int | None = Field(default=None, ge=1)
    """Pods of this stage at once, for the stages with a pod per item (extract: one per
    checkpoint, sae: one per layer); unset: in the gpu profile as many as
    `resources.gpu_budget` GPUs hold, otherwise no cap."""


def _stage_default(cpu: str, memory: str) -> Any:
    return Field(default_factory=lambda: StageResources(cpu=cpu, memory=memory))


class ResourcesSpec(Section):
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
    gpu_budget: Int = Field(default=1, ge=1)
    """GPUs one run's fan-out may hold at once in the gpu profile: a stage with a pod per
    item runs at most gpu_budget // (its pods' GPUs, at least 1) of them at a time, unless
    its own `parallelism` says otherwise."""

    def for_stage(self, stage: str) -> StageResources:
        """The resources of `stage` (one of shared.stage_registry.STATUS_NAMES)."""
        value = getattr(self, stage, None) if stage in type(self).model_fields else None
        if not isinstance(value, StageResources):
            raise KeyError(f"no resources for stage {stage!r}")
        return value

    def fan_out_limit(self, stage: str, on_gpu: bool) -> int | None:
        """Pods of `stage` at once: its `parallelism`, else (pods on GPUs) what the GPU
        budget holds, else None (no cap). Asking the cluster for every layer's GPU pod at
        once leaves most of them pending and the run's quota exhausted."""
        wanted = self.for_stage(stage)
        if wanted.parallelism is not None:
            return wanted.parallelism
        if not on_gpu:
            return None
        return max(1, self.gpu_budget // max(1, wanted.gpus))
