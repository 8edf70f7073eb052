"""The Helm chart: lints, renders, validates against Kubernetes and Argo schemas, is secure.

Dependency charts cannot be downloaded here, and helm refuses to render a chart whose
dependencies are missing even when their conditions are off; so the chart is rendered from
a temporary copy whose charts/ folder holds empty charts of the declared names and
versions (they render nothing), and the Chart.yaml entries are checked on their own.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy import workflow_templates
from deploy.helm_tool import helm_binary
from shared import dashboards
from shared.spec import load_spec
from tests.support import ARGO, ROOT
from workflows.pipeline import Profile
from workflows.submit import CHART_CONFIGMAP
from workflows.template_names import pipeline_template_name, template_names

CHART = ROOT / "helm" / "driftlab"
KIND_VALUES = CHART / "values-kind.yaml"
NAMESPACE = "driftlab"
# Kubernetes versions the core manifests must be valid for: 1.30 and the newest bundled.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CORE_KINDS = {"ServiceAccount", "Role", "RoleBinding", "Secret", "ConfigMap"}
DEPENDENCIES = {
    "argo-workflows": "https://argoproj.github.io/argo-helm",
    "minio": "https://charts.min.io/",
    "prometheus-pushgateway": "https://prometheus-community.github.io/helm-charts",
    "kube-prometheus-stack": "https://prometheus-community.github.io/helm-charts",
}


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_binary()


@pytest.fixture(scope="module")
def chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the chart with empty stand-ins for its dependency charts."""
    copy = tmp_path_factory.mktemp("chart") / "driftlab"
    shutil.copytree(CHART, copy)
    for dep in yaml.safe_load((CHART / "Chart.yaml").read_text())["dependencies"]:
        stub = copy / "charts" / dep["name"]
        stub.mkdir(parents=True)
        (stub / "Chart.yaml").write_text(
            yaml.safe_dump({"apiVersion": "v2", "name": dep["name"], "version": dep["version"]})
        )
    return copy


def _run(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


def _template(helm: Path, chart: Path, *args: str) -> list[dict[str, Any]]:
    done = _run(helm, "template", "driftlab", str(chart), "--namespace", NAMESPACE, *args)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def default_docs(helm: Path, chart: Path) -> list[dict[str, Any]]:
    return _template(helm, chart)


@pytest.fixture(scope="module")
def kind_docs(helm: Path, chart: Path) -> list[dict[str, Any]]:
    return _template(helm, chart, "-f", str(KIND_VALUES))


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _argo_file(name: str) -> Path:
    path = ARGO / name
    if not path.is_file():
        pytest.fail(f"reference data not found at {path}: the tests read ../shared/data")
    return path


@pytest.mark.parametrize("values", [(), ("-f", str(KIND_VALUES))], ids=["default", "kind"])
def test_helm_lint_passes(helm: Path, chart: Path, values: tuple[str, ...]) -> None:
    done = _run(helm, "lint", str(chart), "--strict", *values)
    assert done.returncode == 0, done.stdout + done.stderr


def test_chart_declares_each_optional_dependency_behind_its_condition() -> None:
    deps = {
        d["name"]: d for d in yaml.safe_load((CHART / "Chart.yaml").read_text())["dependencies"]
    }
    assert set(deps) == set(DEPENDENCIES)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    kind = yaml.safe_load(KIND_VALUES.read_text())
    for name, repo in DEPENDENCIES.items():
        assert deps[name]["repository"] == repo
        assert deps[name]["condition"] == f"{name}.enabled"
        assert deps[name]["version"][0].isdigit(), "dependency versions are pinned"
        assert values[name]["enabled"] is False, f"{name} is opt-in"
        assert kind[name]["enabled"] is True, f"the kind cluster brings its own {name}"
    image = values["minio"]["image"]
    assert "@sha256:" in image["tag"] and len(image["tag"].split("@sha256:")[1]) == 64


def test_values_are_documented_field_by_field() -> None:
    """Every top-level key of values.yaml, and every field of driftlab's own sections, has
    a comment on the lines just above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    own = {
        "images",
        "serviceAccount",
        "rbac",
        "s3",
        "store",
        "pushgateway",
        "artifactRepository",
        "workflowTemplates",
        "dashboards",
        "serviceMonitor",
    }
    section = None
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        key = line.strip().split(":")[0]
        if indent == 0:
            section = key
        if indent == 0 or (indent == 2 and section in own):
            assert lines[i - 1].lstrip().startswith("#"), f"values.yaml:{i + 1} {key} undocumented"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("which", ["default_docs", "kind_docs"])
def test_core_manifests_pass_strict_kubernetes_validation(
    which: str, version: str, request: pytest.FixtureRequest
) -> None:
    docs = request.getfixturevalue(which)
    core = [d for d in docs if d["kind"] in CORE_KINDS]
    assert {d["kind"] for d in core} == CORE_KINDS
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_a_misspelt_field(default_docs: list[dict[str, Any]]) -> None:
    role = json.loads(json.dumps(_of_kind(default_docs, "Role")[0]))
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(role, K8S_VERSIONS[0], strict=True)


@pytest.fixture(scope="module")
def template_validators() -> list[Any]:
    schema = json.loads(_argo_file("schema.json").read_text())
    ref = {**schema, "$ref": "#/definitions/io.argoproj.workflow.v1alpha1.WorkflowTemplate"}
    ref.pop("oneOf", None)
    ref.pop("type", None)
    crd = yaml.safe_load(_argo_file("crd-workflowtemplates.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return [
        jsonschema.Draft202012Validator(ref),
        jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"]),
    ]


def _errors(validators: list[Any], doc: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.path))}: {e.message}" for v in validators for e in v.iter_errors(doc)
    ]


@pytest.mark.parametrize("which", ["default_docs", "kind_docs"])
def test_workflow_templates_validate_against_argo_schemas(
    which: str, template_validators: list[Any], request: pytest.FixtureRequest
) -> None:
    templates = _of_kind(request.getfixturevalue(which), "WorkflowTemplate")
    names = {t["metadata"]["name"] for t in templates}
    profile: Profile = "cpu" if which == "kind_docs" else "gpu"  # values-kind.yaml: cpu
    assert names == _versioned_names(profile)
    for doc in templates:
        assert _errors(template_validators, doc) == [], doc["metadata"]["name"]
        assert "@@" not in json.dumps(doc), "a placeholder was left unfilled"


def _versioned_names(profile: Profile) -> set[str]:
    """The names `driftlab submit` looks for, for the spec the chart's profile is built from."""
    spec = load_spec(workflow_templates.PROFILE_SPECS[profile])
    return {pipeline_template_name(spec, profile), *template_names(spec, profile).values()}


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_template_names_carry_the_version_submit_references(profile: Profile) -> None:
    """`driftlab submit` finds the chart's templates by these names: a stage's name changes
    exactly when what it runs changes, so an old chart is never referenced by new code."""
    rendered = workflow_templates.render(profile)
    names = {m["metadata"]["name"] for m in rendered.values()}
    assert names == _versioned_names(profile)
    for task in workflow_templates.STAGE_TASKS:
        name = rendered[f"driftlab-{task}.yaml"]["metadata"]["name"]
        assert re.fullmatch(rf"driftlab-{task}-v[0-9a-f]{{10}}", name)
    assert re.fullmatch(
        r"driftlab-pipeline-v[0-9a-f]{10}", rendered["driftlab-pipeline.yaml"]["metadata"]["name"]
    )


def test_the_check_catches_a_template_of_another_version(tmp_path: Path) -> None:
    """`--check` stays honest: a file whose template name is stale is reported."""
    out = tmp_path / "workflowtemplates"
    written = workflow_templates.write(out)
    assert workflow_templates.stale_files(out) == []
    text = written[0].read_text()
    old = re.search(r"name: (driftlab-[a-z-]+-v[0-9a-f]{10})", text)
    assert old is not None
    written[0].write_text(text.replace(old.group(1), old.group(1)[:-1] + "x"))
    assert workflow_templates.stale_files(out) == [str(written[0])]


def test_the_config_map_names_the_release_store(helm: Path, chart: Path) -> None:
    """What `driftlab submit` reads when given no --store (workflows/submit.py)."""
    for args, store in (
        ((), "s3://driftlab"),
        (("--set", "store.url=s3://lab/runs"), "s3://lab/runs"),
    ):
        (config,) = [
            d for d in _template(helm, chart, *args) if d["metadata"]["name"] == CHART_CONFIGMAP
        ]
        assert config["kind"] == "ConfigMap"
        assert config["metadata"]["namespace"] == NAMESPACE
        assert config["data"] == {"store": store}


def test_argo_schema_catches_a_broken_template(
    default_docs: list[dict[str, Any]], template_validators: list[Any]
) -> None:
    doc = json.loads(json.dumps(_of_kind(default_docs, "WorkflowTemplate")[0]))
    doc["spec"]["templates"][0]["retryStrategy"] = {"limit": {"not": "a number"}}
    assert _errors(template_validators, doc)


def test_checked_in_workflow_templates_match_the_pipeline_builder() -> None:
    assert workflow_templates.stale_files() == [], "run `make helm-templates`"


def test_release_values_reach_the_workflow_templates(kind_docs: list[dict[str, Any]]) -> None:
    (pipeline,) = [d for d in kind_docs if d["metadata"]["name"].startswith("driftlab-pipeline-")]
    spec = pipeline["spec"]
    assert pipeline["metadata"]["namespace"] == NAMESPACE
    assert spec["serviceAccountName"] == "driftlab-workflow"
    params = {p["name"]: p.get("value") for p in spec["arguments"]["parameters"]}
    assert params["run"] is None and params["store"] == "s3://driftlab"
    assert json.loads(params["layers"]) == [0, 1]  # tiny-cpu: 1 layer + embeddings
    containers = [t["container"] for t in spec["templates"] if "container" in t]
    for c in containers:
        assert c["image"].startswith("driftlab/driftlab-") and c["image"].endswith(":latest")
        assert c["imagePullPolicy"] == "Never"
        env = {e["name"]: e for e in c["env"]}
        assert env["DRIFTLAB_S3_ENDPOINT"]["value"] == "http://minio:9000"
        assert env["DRIFTLAB_PUSHGATEWAY"]["value"] == "http://pushgateway:9091"
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "driftlab-s3"
        # cpu profile: no GPU placement at all
        assert "nvidia.com/gpu" not in json.dumps(c.get("resources", {}))
    assert not any("nodeSelector" in t or "tolerations" in t for t in spec["templates"])


def test_gpu_profile_places_gpu_stages_on_gpu_nodes(default_docs: list[dict[str, Any]]) -> None:
    (train,) = [d for d in default_docs if d["metadata"]["name"].startswith("driftlab-train-")]
    (template,) = train["spec"]["templates"]
    assert template["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert template["container"]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_a_bad_profile_fails_the_render(helm: Path, chart: Path) -> None:
    done = _run(helm, "template", "x", str(chart), "--set", "workflowTemplates.profile=tpu")
    assert done.returncode != 0 and "workflowTemplates.profile must be gpu or cpu" in done.stderr


def _pod_specs(
    docs: list[dict[str, Any]],
) -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(name, pod-level securityContext, containers) of every pod the chart can start."""
    for doc in docs:
        if doc["kind"] in {"WorkflowTemplate", "Workflow"}:
            spec = doc["spec"]
            containers = [t["container"] for t in spec["templates"] if "container" in t]
            yield doc["metadata"]["name"], spec.get("securityContext", {}), containers
        elif doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            pod = doc["spec"]["template"]["spec"]
            yield doc["metadata"]["name"], pod.get("securityContext", {}), pod["containers"]


@pytest.mark.parametrize("which", ["default_docs", "kind_docs"])
def test_every_pod_is_non_root_without_privileges(
    which: str, request: pytest.FixtureRequest
) -> None:
    pods = list(_pod_specs(request.getfixturevalue(which)))
    assert pods
    for name, pod, containers in pods:
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) > 0, name
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        for c in containers:
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("readOnlyRootFilesystem") is True, name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
            assert not sc.get("capabilities", {}).get("add"), name
            assert not sc.get("privileged"), name
            assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), name


_CREDENTIAL_WORDS = ("KEY", "SECRET", "PASSWORD", "TOKEN", "CREDENTIAL")


@pytest.mark.parametrize("which", ["default_docs", "kind_docs"])
def test_no_credential_in_a_plain_env_value(which: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(which)
    secrets = _of_kind(docs, "Secret")
    values = {base64.b64decode(v).decode() for s in secrets for v in s["data"].values()}
    for _, _, containers in _pod_specs(docs):
        for c in containers:
            for env in c.get("env", []):
                if any(word in env["name"].upper() for word in _CREDENTIAL_WORDS):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env["name"]
                assert env.get("value") not in values, f"{env['name']} holds a secret's value"
    for cm in _of_kind(docs, "ConfigMap"):
        text = json.dumps(cm["data"])
        assert not any(v in text for v in values if len(v) >= 8), cm["metadata"]["name"]


def test_role_grants_only_what_the_executor_needs(default_docs: list[dict[str, Any]]) -> None:
    (role,) = _of_kind(default_docs, "Role")
    assert role["rules"] == [
        {
            "apiGroups": ["argoproj.io"],
            "resources": ["workflowtaskresults"],
            "verbs": ["create", "patch"],
        }
    ]
    assert not _of_kind(default_docs, "ClusterRole")
    (binding,) = _of_kind(default_docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "driftlab-workflow", "namespace": NAMESPACE}
    ]


def test_s3_secret_generated_given_or_existing(
    helm: Path, chart: Path, kind_docs: list[dict[str, Any]]
) -> None:
    (secret,) = _of_kind(kind_docs, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["AWS_ACCESS_KEY_ID"] == data["rootUser"] == "driftlab-kind"  # MinIO shares them
    assert data["AWS_SECRET_ACCESS_KEY"] == data["rootPassword"]

    (generated,) = _of_kind(_template(helm, chart), "Secret")
    keys = {k: base64.b64decode(v).decode() for k, v in generated["data"].items()}
    assert set(keys) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert len(keys["AWS_ACCESS_KEY_ID"]) == 20 and len(keys["AWS_SECRET_ACCESS_KEY"]) == 40

    docs = _template(helm, chart, "--set", "s3.existingSecret=mine")
    assert not _of_kind(docs, "Secret")
    (repo,) = [
        d for d in _of_kind(docs, "ConfigMap") if d["metadata"]["name"] == "artifact-repositories"
    ]
    assert yaml.safe_load(repo["data"]["driftlab-s3"])["s3"]["accessKeySecret"]["name"] == "mine"
    for t in _of_kind(docs, "WorkflowTemplate"):
        assert '"name": "driftlab-s3"' not in json.dumps(t), "templates follow existingSecret"


def test_artifact_repository_is_the_namespace_default(default_docs: list[dict[str, Any]]) -> None:
    (cm,) = [
        d
        for d in _of_kind(default_docs, "ConfigMap")
        if d["metadata"]["name"] == "artifact-repositories"
    ]
    key = cm["metadata"]["annotations"]["workflows.argoproj.io/default-artifact-repository"]
    repo = yaml.safe_load(cm["data"][key])
    assert repo["s3"]["bucket"] == "driftlab" and repo["s3"]["endpoint"] == "minio:9000"
    assert repo["s3"]["keyFormat"] == "argo/{{workflow.name}}/{{pod.name}}"


def test_dashboard_configmap_carries_the_generated_json(default_docs: list[dict[str, Any]]) -> None:
    (cm,) = [
        d
        for d in _of_kind(default_docs, "ConfigMap")
        if d["metadata"]["labels"].get("grafana_dashboard")
    ]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"][dashboards.DASHBOARD_FILE]) == dashboards.dashboard()


def test_service_monitor_scrapes_the_pushgateway_with_the_release_label(
    helm: Path, chart: Path, kind_docs: list[dict[str, Any]]
) -> None:
    (sm,) = _of_kind(kind_docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "driftlab"  # the release's own stack
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    assert sm["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "prometheus-pushgateway"
    }
    docs = _template(
        helm, chart, "--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.release=kps"
    )
    assert _of_kind(docs, "ServiceMonitor")[0]["metadata"]["labels"]["release"] == "kps"


def test_install_notes_name_the_versioned_pipeline_template(helm: Path, chart: Path) -> None:
    done = _run(helm, "install", "driftlab", str(chart), "-n", NAMESPACE, "--dry-run=client")
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    pipeline = pipeline_template_name(load_spec(workflow_templates.PROFILE_SPECS["gpu"]), "gpu")
    assert f"--from workflowtemplate/{pipeline} -p run=RUN_ID" in notes
