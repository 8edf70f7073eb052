"""Putting a workflow on a cluster: choose the profile, register the runs, submit, follow.

`--via argo` talks to the Argo server through Hera's WorkflowsService (token auth, what
the Argo UI shows); `--via kubernetes` creates the Workflow custom object with the
kubernetes client and the local kubeconfig, for clusters whose Argo server is not exposed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any

from hera.workflows.models import WorkflowCreateRequest

from shared.errors import DriftlabError
from workflows.pipeline import GPU_RESOURCE, Profile
from workflows.submission import Builder, pipeline_builder

ARGO_GROUP = "argoproj.io"
ARGO_VERSION = "v1alpha1"
#: The ConfigMap the chart installs (helm/driftlab/templates/config.yaml); its `store` is
#: where submitted runs go when neither --store nor $DRIFTLAB_STORE says.
CHART_CONFIGMAP = "driftlab-config"
_DONE_PHASES = ("Succeeded", "Failed", "Error")


class SubmitError(DriftlabError):
    """The workflow could not be loaded, or the cluster refused or could not be reached."""


def load_builder(target: str) -> Builder:
    """A workflow module's `build`, or a builder for a run spec YAML file."""
    path = Path(target)
    if not path.is_file():
        raise SubmitError(
            f"{target}: no such file; give a workflow module (workflows/*.py) or a run spec"
        )
    if path.suffix in (".yaml", ".yml"):
        return pipeline_builder(path)
    if path.suffix != ".py":
        raise SubmitError(f"{target}: expected a workflow module (.py) or a run spec (.yaml)")
    module_spec = importlib.util.spec_from_file_location(f"_driftlab_workflow_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise SubmitError(f"{target}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    build = getattr(module, "build", None)
    if not callable(build):
        raise SubmitError(
            f"{target}: has no build(profile, store=...) function; see workflows/tiny_cpu.py"
        )
    builder: Builder = build
    return builder


def has_gpu(node: Any) -> bool:
    """Whether a node (kubernetes V1Node) offers at least one allocatable GPU."""
    allocatable: Mapping[str, str] = (node.status and node.status.allocatable) or {}
    try:
        return int(str(allocatable.get(GPU_RESOURCE, "0"))) > 0
    except ValueError:
        return False


def choose_profile(nodes: Iterable[Any]) -> tuple[Profile, str]:
    """gpu when some node has allocatable nvidia.com/gpu, else cpu; and why, for people."""
    gpu_nodes = [n.metadata.name for n in nodes if has_gpu(n)]
    if gpu_nodes:
        return "gpu", f"{len(gpu_nodes)} node(s) with allocatable {GPU_RESOURCE}: gpu profile"
    return "cpu", f"no node with allocatable {GPU_RESOURCE}: using the cpu profile"


def list_nodes() -> list[Any]:
    """The cluster's nodes, through the kubeconfig (or the in-cluster service account)."""
    from kubernetes import client

    _load_kube_config("to choose the profile, or pass --profile gpu|cpu")
    try:
        items: list[Any] = client.CoreV1Api().list_node().items
    except Exception as err:
        raise SubmitError(f"cannot list the cluster's nodes: {_reason(err)}") from None
    return items


def check_kubernetes() -> None:
    """Fail fast, before the store is touched, when `--via kubernetes` cannot reach the API.

    `/version` is readable by every authenticated user, so a refusal there is the
    kubeconfig's fault, not a missing RBAC rule.
    """
    from kubernetes import client

    _load_kube_config("to create the Workflow, or use --via argo")
    try:
        client.VersionApi().get_code()
    except Exception as err:
        raise SubmitError(
            f"the Kubernetes API of the kubeconfig's current context does not answer "
            f"({_reason(err)}): fix KUBECONFIG or its context, or use --via argo"
        ) from None


def check_argo_server(server: str, token: str | None, namespace: str) -> None:
    """Fail fast, before the store is touched, when the Argo server does not answer."""
    from hera.workflows import WorkflowsService

    if not server:
        raise SubmitError(
            "no Argo server: pass --argo-server URL or set $ARGO_SERVER (or use --via kubernetes)"
        )
    try:
        WorkflowsService(host=server, token=token, namespace=namespace).get_version()
    except Exception as err:
        raise SubmitError(
            f"Argo server {server} does not answer ({_reason(err)}): check --argo-server and "
            "--token (or $ARGO_SERVER, $ARGO_TOKEN), or use --via kubernetes"
        ) from None


def chart_store(namespace: str) -> str | None:
    """The store URL the chart's ConfigMap names in `namespace`; None when there is none."""
    from kubernetes import client

    _load_kube_config(f"to read the store from the ConfigMap {CHART_CONFIGMAP}, or pass --store")
    try:
        config_map: Any = client.CoreV1Api().read_namespaced_config_map(CHART_CONFIGMAP, namespace)
    except Exception as err:
        if getattr(err, "status", None) == 404:
            return None
        raise SubmitError(
            f"cannot read the ConfigMap {namespace}/{CHART_CONFIGMAP}: {_reason(err)}; "
            "pass --store URL or set $DRIFTLAB_STORE"
        ) from None
    store: str | None = (config_map.data or {}).get("store") or None
    return store


def _load_kube_config(why: str) -> None:
    from kubernetes import config

    try:
        # $KUBECONFIG read now: the client reads it once, when it is imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    except Exception:
        try:
            config.load_incluster_config()
        except Exception:
            raise SubmitError(
                f"no Kubernetes configuration: set KUBECONFIG (or ~/.kube/config) {why}"
            ) from None


def _reason(err: Exception) -> str:
    status = getattr(err, "status", None)
    reason = getattr(err, "reason", None)
    if status:
        return f"HTTP {status} {reason or ''}".strip()
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def installed_templates(via: str, server: str, token: str | None, namespace: str) -> list[str]:
    """Names of the WorkflowTemplates in `namespace`, through the same API submit uses."""
    try:
        if via == "argo":
            from hera.workflows import WorkflowsService

            service = WorkflowsService(host=server, token=token, namespace=namespace)
            listed = service.list_workflow_templates(namespace=namespace)
            return [str(t.metadata.name) for t in listed.items or []]
        from kubernetes import client

        found: Any = client.CustomObjectsApi().list_namespaced_custom_object(
            ARGO_GROUP, ARGO_VERSION, namespace, "workflowtemplates"
        )
    except Exception as err:
        raise SubmitError(
            f"cannot list the WorkflowTemplates of {namespace}: {_reason(err)}"
        ) from None
    return [str(item["metadata"]["name"]) for item in found.get("items") or []]


def submit_argo(manifest: Mapping[str, Any], server: str, token: str | None, namespace: str) -> str:
    """POST the workflow to the Argo server; the name it was created under."""
    from hera.workflows import WorkflowsService

    service = WorkflowsService(host=server, token=token, namespace=namespace)
    try:
        created = service.create_workflow(
            WorkflowCreateRequest.model_validate({"workflow": manifest}), namespace=namespace
        )
    except Exception as err:
        _refuse_existing(err, manifest, namespace)
        raise SubmitError(f"Argo server {server} refused the workflow: {_reason(err)}") from None
    return str(created.metadata.name)


def submit_kubernetes(manifest: Mapping[str, Any], namespace: str) -> str:
    """Create the Workflow custom object directly; the Argo controller picks it up."""
    from kubernetes import client

    _load_kube_config("to create the Workflow, or use --via argo")
    try:
        created: Any = client.CustomObjectsApi().create_namespaced_custom_object(
            ARGO_GROUP, ARGO_VERSION, namespace, "workflows", dict(manifest)
        )
    except Exception as err:
        _refuse_existing(err, manifest, namespace)
        raise SubmitError(f"cannot create the Workflow in {namespace}: {_reason(err)}") from None
    return str(created["metadata"]["name"])


def _refuse_existing(err: Exception, manifest: Mapping[str, Any], namespace: str) -> None:
    """A workflow is named after its run, so resubmitting a run (`--run`) meets the last
    workflow of it while Argo keeps it: say how to clear it."""
    if getattr(err, "status_code", getattr(err, "status", None)) != HTTPStatus.CONFLICT:
        return
    name = manifest["metadata"]["name"]
    raise SubmitError(
        f"workflow {name} already exists in {namespace}: delete it first (`argo delete -n "
        f"{namespace} {name}`, or `kubectl delete workflow -n {namespace} {name}`); the run's "
        "finished stages stay cached"
    ) from None


def phase_reader(
    via: str, server: str, token: str | None, namespace: str
) -> Callable[[str], dict[str, Any]]:
    """A function from workflow name to its current status (`phase`, `nodes`)."""
    if via == "argo":
        from hera.workflows import WorkflowsService

        service = WorkflowsService(host=server, token=token, namespace=namespace)

        def from_argo(name: str) -> dict[str, Any]:
            wf = service.get_workflow(name, namespace=namespace)
            status: dict[str, Any] = (
                wf.status.model_dump(mode="json", by_alias=True) if wf.status else {}
            )
            return status

        return from_argo
    from kubernetes import client

    api = client.CustomObjectsApi()

    def from_kubernetes(name: str) -> dict[str, Any]:
        obj: Any = api.get_namespaced_custom_object(
            ARGO_GROUP, ARGO_VERSION, namespace, "workflows", name
        )
        status: dict[str, Any] = obj.get("status") or {}
        return status

    return from_kubernetes


def follow(name: str, read: Callable[[str], dict[str, Any]], interval_s: float = 10.0) -> str:
    """Print each pod's phase changes until the workflow ends; its final phase."""
    seen: dict[str, str] = {}
    while True:
        status = read(name)
        for node in (status.get("nodes") or {}).values():
            if node.get("type") not in ("Pod", "Retry"):
                continue
            label = str(node.get("displayName") or node.get("name"))
            phase = str(node.get("phase"))
            if seen.get(label) != phase:
                seen[label] = phase
                print(f"{label} {phase.lower()}", file=sys.stderr, flush=True)
        phase = str(status.get("phase") or "Pending")
        if phase in _DONE_PHASES:
            return phase
        time.sleep(interval_s)
