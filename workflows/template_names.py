"""The versioned names of the chart's WorkflowTemplates, shared by the chart and `submit`.

A stage's WorkflowTemplate is `driftlab-<task>-v<digest>`, and the whole graph's
`driftlab-pipeline-v<digest>`: the digest is of the template as `build_workflow` makes it
for a spec and profile, with what a Helm release decides (images, namespace, endpoints,
Secret, store) left as @@NAME@@ placeholders. So a name pins the command line, resources,
placement, retries and metrics of what it runs: deploy/workflow_templates.py names the
chart's files' templates so, and `driftlab submit` references them (templateRef) only when
the cluster holds the very names this spec and profile would have, else it inlines them.
A chart of another driftlab version, or a spec with other resources, never runs under a
template that says something else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from typing import Any

from shared.spec import RunSpec
from workflows.pipeline import STAGE_TASKS, Cluster, Images, Profile, build_workflow, compiled

PIPELINE_TEMPLATE = "driftlab-pipeline"
#: A valid run id for the builder; the chart's templates replace it with the `run` parameter.
PLACEHOLDER_RUN = "template-20000101-000000-000000"
PLACEHOLDER_STORE = "@@STORE@@"
PLACEHOLDER_IMAGES = Images(registry="@@REGISTRY@@", tag="@@TAG@@")
PLACEHOLDER_CLUSTER = Cluster(
    namespace="@@NAMESPACE@@",
    service_account="@@SERVICE_ACCOUNT@@",
    s3_endpoint="@@S3_ENDPOINT@@",
    s3_secret="@@S3_SECRET@@",
    pushgateway="@@PUSHGATEWAY@@",
)
_DIGEST_CHARS = 10


def placeholder_manifest(spec: RunSpec, profile: Profile) -> dict[str, Any]:
    """The compiled workflow of `spec` with the release's values as placeholders."""
    workflow = build_workflow(
        spec,
        profile,
        images=PLACEHOLDER_IMAGES,
        store=PLACEHOLDER_STORE,
        run_id=PLACEHOLDER_RUN,
        cluster=PLACEHOLDER_CLUSTER,
    )
    return compiled(workflow)


def template_names(spec: RunSpec, profile: Profile) -> dict[str, str]:
    """Stage task -> the versioned name of its WorkflowTemplate."""
    manifest = placeholder_manifest(spec, profile)
    templates = {t["name"]: t for t in manifest["spec"]["templates"]}
    return {task: f"driftlab-{task}-v{_digest(templates[task])}" for task in STAGE_TASKS}


def pipeline_template_name(spec: RunSpec, profile: Profile) -> str:
    """The versioned name of the whole graph's WorkflowTemplate."""
    return f"{PIPELINE_TEMPLATE}-v{_digest(placeholder_manifest(spec, profile)['spec'])}"


def installed_refs(
    spec: RunSpec, profile: Profile, installed: Collection[str]
) -> dict[str, str] | None:
    """Task -> WorkflowTemplate to reference, when the cluster holds every one; else None."""
    names = template_names(spec, profile)
    return names if set(names.values()) <= set(installed) else None


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_DIGEST_CHARS]
