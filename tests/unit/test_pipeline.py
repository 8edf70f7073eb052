"""The Argo graph: schema-valid for every module and profile, stable, GPU placement exact.

Golden files live in tests/golden/workflows/; after an intended change, regenerate them
with `DRIFTLAB_UPDATE_GOLDEN=1 pytest tests/unit/test_pipeline.py` and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from shared import layout
from shared.spec import apply_overrides, load_spec
from tests.support import ARGO, GOLDEN, ROOT, TINY_SPEC
from workflows.local.manifest import read_workflow
from workflows.pipeline import (
    EXIT_HANDLER,
    GPU_RESOURCE,
    GPU_STAGES,
    IMAGE_UID,
    STAGE_TASKS,
    WorkflowError,
    build_sweep_workflow,
    build_workflow,
    compiled,
    sae_layers,
)
from workflows.submit import load_builder
from workflows.template_names import installed_refs, template_names

GOLDEN_WORKFLOWS = GOLDEN / "workflows"
MODULES = ("tiny_cpu", "gpt2_small", "gpt2_medium", "grokking", "sweep")
_RUN_STAMP = re.compile(r"-\d{8}-\d{6}-[0-9a-f]{6}")


def _argo_file(name: str) -> Path:
    path = ARGO / name
    if not path.is_file():
        pytest.fail(
            f"reference data not found at {path}: the tests read ../shared/data beside the checkout"
        )
    return path


@pytest.fixture(scope="module")
def schema_validator() -> Any:
    schema = json.loads(_argo_file("schema.json").read_text())
    workflow = {**schema, "$ref": "#/definitions/io.argoproj.workflow.v1alpha1.Workflow"}
    workflow.pop("oneOf", None)
    workflow.pop("type", None)
    return jsonschema.Draft202012Validator(workflow)


@pytest.fixture(scope="module")
def crd_validator() -> Any:
    crd = yaml.safe_load(_argo_file("crd-workflows.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])


@pytest.fixture(autouse=True)
def _default_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DRIFTLAB_REGISTRY", "DRIFTLAB_IMAGE_TAG", "DRIFTLAB_STORE"):
        monkeypatch.delenv(name, raising=False)


def _manifest(module: str, profile: str) -> dict[str, Any]:
    build = load_builder(str(ROOT / "workflows" / f"{module}.py"))
    return compiled(build(profile, store="s3://driftlab").workflow)  # type: ignore[arg-type]


def _errors(validator: Any, manifest: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(manifest)]


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
@pytest.mark.parametrize("module", MODULES)
def test_every_module_is_valid_and_matches_its_golden_file(
    module: str, profile: str, schema_validator: Any, crd_validator: Any
) -> None:
    manifest = _manifest(module, profile)
    assert _errors(schema_validator, manifest) == []
    assert _errors(crd_validator, manifest) == []
    text = _RUN_STAMP.sub("-RUNSTAMP", yaml.safe_dump(manifest, sort_keys=False))
    golden = GOLDEN_WORKFLOWS / f"{module}-{profile}.yaml"
    if os.environ.get("DRIFTLAB_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"{golden} is missing: run with DRIFTLAB_UPDATE_GOLDEN=1"
    assert text == golden.read_text()


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
@pytest.mark.parametrize("module", MODULES)
def test_the_local_runner_reads_every_compiled_workflow(module: str, profile: str) -> None:
    """What the pipeline emits is exactly what workflows/local accepts, sweeps included."""
    workflow = read_workflow(_manifest(module, profile))
    assert workflow.on_exit == EXIT_HANDLER


def test_schema_validation_catches_a_broken_workflow(
    schema_validator: Any, crd_validator: Any
) -> None:
    manifest = _manifest("tiny_cpu", "gpu")
    manifest["spec"]["templates"][0]["retryStrategy"]["limit"] = [2]
    manifest["spec"]["podGC"] = "always"
    assert _errors(schema_validator, manifest)
    assert _errors(crd_validator, manifest)


def _templates(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in manifest["spec"]["templates"]}


@pytest.mark.parametrize("module", MODULES)
def test_gpu_placement_is_exactly_on_the_gpu_stages(module: str) -> None:
    gpu = _templates(_manifest(module, "gpu"))
    cpu = _templates(_manifest(module, "cpu"))
    assert set(GPU_STAGES) == {"train", "extract", "sae-train", "detect"}
    for name in STAGE_TASKS:
        on_gpu = name in GPU_STAGES
        limits = gpu[name]["container"]["resources"].get("limits", {})
        assert (GPU_RESOURCE in limits) is on_gpu, name
        assert ("nodeSelector" in gpu[name]) is on_gpu, name
        assert (gpu[name].get("tolerations") or []) == (
            [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}] if on_gpu else []
        ), name
        if on_gpu:
            assert gpu[name]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        for key in ("nodeSelector", "tolerations"):
            assert key not in cpu[name], (name, key)
        text = json.dumps(cpu[name])
        assert GPU_RESOURCE not in text, name
        if name != "list-checkpoints":
            args = cpu[name]["container"]["args"]
            assert args[args.index("--device") + 1] == "cpu", name


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
@pytest.mark.parametrize("module", MODULES)
def test_every_pod_is_non_root_with_a_read_only_root_and_a_writable_tmp(
    module: str, profile: str
) -> None:
    spec = _manifest(module, profile)["spec"]
    assert spec["securityContext"] == {
        "fsGroup": IMAGE_UID,
        "runAsGroup": IMAGE_UID,
        "runAsNonRoot": True,
        "runAsUser": IMAGE_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    containers = {t["name"]: t for t in spec["templates"] if "container" in t}
    assert set(containers) == {*STAGE_TASKS, EXIT_HANDLER}
    for name, template in containers.items():
        container = template["container"]
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        }, name
        (tmp,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        volumes = {v["name"]: v for v in [*template.get("volumes", []), *spec.get("volumes", [])]}
        assert volumes[tmp["name"]] == {"name": tmp["name"], "emptyDir": {}}, name


def test_templates_carry_the_cluster_contract() -> None:
    spec = apply_overrides(load_spec(TINY_SPEC), {"detect.enabled": True})  # every stage
    manifest = compiled(build_workflow(spec, "gpu", store="s3://bucket/runs", run_id="tiny-1"))
    meta = manifest["metadata"]
    assert meta["name"] == "tiny-1"
    assert meta["labels"] == {"app.kubernetes.io/name": "driftlab", "driftlab.io/run-id": "tiny-1"}
    assert manifest["spec"]["podMetadata"]["labels"] == meta["labels"]
    assert manifest["spec"]["onExit"] == "finish"
    assert manifest["spec"]["podGC"]["strategy"] and manifest["spec"]["ttlStrategy"]
    templates = _templates(manifest)
    for name in (*STAGE_TASKS, "finish"):
        template = templates[name]
        container = template["container"]
        assert container["command"][0] == "python", name  # never the image's entrypoint
        assert container["args"][:4] == [
            "--run",
            "{{workflow.parameters.run}}" if name == "finish" else "{{inputs.parameters.run}}",
            "--store",
            "{{workflow.parameters.store}}",
        ]
        env = {e["name"]: e for e in container["env"]}
        for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert set(env[secret]) == {"name", "valueFrom"}  # a reference, never a value
            assert env[secret]["valueFrom"]["secretKeyRef"]["key"] == secret
        assert env["DRIFTLAB_S3_ENDPOINT"]["value"] and env["DRIFTLAB_PUSHGATEWAY"]["value"]
        assert int(template["activeDeadlineSeconds"]) > 0
        assert int(template["retryStrategy"]["limit"]) == 2
    for name in STAGE_TASKS:
        metrics = templates[name]["metrics"]["prometheus"]
        assert {m["name"] for m in metrics} == {
            "driftlab_task_duration_seconds",
            "driftlab_task_total",
        }
    assert templates["train"]["retryStrategy"]["backoff"]["factor"] == "2"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in templates["train"]["container"][
        "volumeMounts"
    ]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in templates["train"]["volumes"]
    resources = templates["train"]["container"]["resources"]
    assert resources["requests"]["cpu"] == spec.resources.train.cpu
    assert resources["requests"]["memory"] == spec.resources.train.memory

    tasks = {t["name"]: t for t in templates["pipeline"]["dag"]["tasks"]}
    assert tasks["evaluate"]["depends"] == "ot && detect"
    assert tasks["detect"]["depends"] == "sae-train"
    # The gpu profile caps the GPU fan-outs (resources.gpu_budget 1: one pod at a time).
    checkpoints = "{{tasks.list-checkpoints.outputs.result}}"
    assert _arguments(tasks["extract"]) == {
        "run": "{{inputs.parameters.run}}",
        "items": checkpoints,
    }
    assert json.loads(_arguments(tasks["sae-train"])["items"]) == [0, 1]  # 1 block + embeddings
    uncapped = _templates(
        compiled(build_workflow(spec, "cpu", store="s3://bucket/runs", run_id="tiny-1"))
    )
    tasks = {t["name"]: t for t in uncapped["pipeline"]["dag"]["tasks"]}
    assert tasks["extract"]["withParam"] == checkpoints
    assert tasks["sae-train"]["withItems"] == [0, 1]


def _arguments(task: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["value"] for p in task["arguments"]["parameters"]}


def _fan_out(manifest: dict[str, Any], task: str) -> tuple[int | None, dict[str, Any]]:
    """The pods-at-once cap of a fan-out task (None: uncapped) and its looping task."""
    templates = _templates(manifest)
    (outer,) = [t for t in templates["pipeline"]["dag"]["tasks"] if t["name"] == task]
    if "withItems" in outer or "withParam" in outer:
        return None, outer
    wrapper = templates[outer["template"]]
    (inner,) = wrapper["dag"]["tasks"]
    assert inner["withParam"] == "{{inputs.parameters.items}}"
    return wrapper["parallelism"], inner


@pytest.mark.parametrize(
    ("overrides", "profile", "sae_cap", "extract_cap"),
    [
        ({}, "gpu", 1, 1),  # the default budget: one GPU for the run's fan-out
        ({"resources.gpu_budget": 8}, "gpu", 8, 8),
        ({"resources.gpu_budget": 8, "resources.sae.gpus": 2}, "gpu", 4, 8),
        ({"resources.sae.parallelism": 3}, "gpu", 3, 1),
        ({}, "cpu", None, None),  # no GPUs asked for: no cap unless the spec sets one
        ({"resources.sae.parallelism": 2}, "cpu", 2, None),
    ],
)
def test_fan_outs_are_capped_by_the_gpu_budget_or_their_parallelism(
    overrides: dict[str, Any],
    profile: str,
    sae_cap: int | None,
    extract_cap: int | None,
    schema_validator: Any,
    crd_validator: Any,
) -> None:
    """gpt2-medium's 25 SAE pods (24Gi, a GPU each) must not all be asked for at once."""
    spec = apply_overrides(load_spec(ROOT / "configs" / "gpt2-medium.yaml"), overrides)
    manifest = compiled(build_workflow(spec, profile, store="s3://b", run_id="m-1"))  # type: ignore[arg-type]
    assert _errors(schema_validator, manifest) == []
    assert _errors(crd_validator, manifest) == []
    cap, sae = _fan_out(manifest, "sae-train")
    assert cap == sae_cap
    assert _arguments(sae)["layer"] == "{{item}}"
    assert _fan_out(manifest, "extract")[0] == extract_cap
    read_workflow(manifest)  # the local runner runs the capped form too


def test_template_refs_replace_the_inline_stage_templates(
    schema_validator: Any, crd_validator: Any
) -> None:
    spec = load_spec(ROOT / "configs" / "gpt2-medium.yaml")
    refs = template_names(spec, "gpu")
    manifest = compiled(build_workflow(spec, "gpu", store="s3://b", run_id="m-1", refs=refs))
    assert _errors(schema_validator, manifest) == []
    assert _errors(crd_validator, manifest) == []
    templates = _templates(manifest)
    assert not set(STAGE_TASKS) & set(templates)  # nothing of a stage is inlined
    referenced = {}
    for template in templates.values():
        for task in template.get("dag", {}).get("tasks", []):
            if "templateRef" in task:
                referenced[task["name"]] = task["templateRef"]
    assert referenced == {t: {"name": refs[t], "template": t} for t in STAGE_TASKS}
    assert all(re.fullmatch(rf"driftlab-{t}-v[0-9a-f]{{10}}", refs[t]) for t in STAGE_TASKS)


def test_template_versions_follow_what_the_template_runs() -> None:
    spec = load_spec(ROOT / "configs" / "gpt2-medium.yaml")
    names = template_names(spec, "gpu")
    assert names == template_names(spec, "gpu")  # no clock, no randomness
    cpu = template_names(spec, "cpu")
    # Every stage's pods differ between profiles but the checkpoint listing's (no device).
    assert {t for t in STAGE_TASKS if names[t] == cpu[t]} == {"list-checkpoints"}
    bigger = template_names(apply_overrides(spec, {"resources.sae.memory": "32Gi"}), "gpu")
    assert {t for t in STAGE_TASKS if names[t] != bigger[t]} == {"sae-train"}
    assert installed_refs(spec, "gpu", [*names.values(), "other"]) == names
    assert installed_refs(spec, "gpu", list(cpu.values())) is None
    assert installed_refs(spec, "gpu", list(names.values())[1:]) is None  # all or none


def test_a_spec_without_detection_has_no_detect_task(schema_validator: Any) -> None:
    spec = apply_overrides(load_spec(TINY_SPEC), {"detect.enabled": False})
    manifest = compiled(build_workflow(spec, "cpu", store="s3://b", run_id="t-1"))
    assert _errors(schema_validator, manifest) == []
    tasks = {t["name"]: t for t in _templates(manifest)["pipeline"]["dag"]["tasks"]}
    assert "detect" not in tasks
    assert tasks["evaluate"]["depends"] == "ot && sae-train"
    with pytest.raises(WorkflowError, match="a-2 differs"):
        detecting = apply_overrides(load_spec(TINY_SPEC), {"detect.enabled": True})
        build_sweep_workflow({"a-1": detecting, "a-2": spec}, "demo", "cpu", store="s3://b")


def test_cpu_profile_caps_requests_but_keeps_memory_limits() -> None:
    spec = load_spec(ROOT / "configs" / "gpt2-medium.yaml")
    templates = _templates(compiled(build_workflow(spec, "cpu", store="s3://b", run_id="m-1")))
    sae = templates["sae-train"]["container"]["resources"]
    assert sae["requests"] == {"cpu": "1", "memory": "2Gi"}
    assert sae["limits"] == {"memory": "24Gi"}


def test_sae_layers_follow_the_spec() -> None:
    spec = load_spec(TINY_SPEC)
    assert sae_layers(spec) == [0, 1]
    assert sae_layers(apply_overrides(spec, {"model.n_layer": 2, "sae.layers": [2, 0]})) == [0, 2]
    assert sae_layers(apply_overrides(spec, {"model.n_layer": 4})) == [0, 1, 2, 3, 4]


def test_sweep_workflow_runs_every_run_with_a_parallelism_limit() -> None:
    spec = load_spec(TINY_SPEC)
    specs = {"a-1": spec, "a-2": apply_overrides(spec, {"run.seed": 3})}
    manifest = compiled(build_sweep_workflow(specs, "demo", "cpu", store="s3://b", parallelism=1))
    sweep = _templates(manifest)["sweep"]
    assert sweep["parallelism"] == 1
    assert [t["arguments"]["parameters"] for t in sweep["dag"]["tasks"]] == [
        [{"name": "run", "value": "a-1"}],
        [{"name": "run", "value": "a-2"}],
    ]
    assert _templates(manifest)["finish"]["container"]["args"][:4] == [
        "--run",
        "a-1",
        "--run",
        "a-2",
    ]
    deeper = {**specs, "a-3": apply_overrides(spec, {"model.n_layer": 3})}
    with pytest.raises(WorkflowError, match="a-3 differs"):
        build_sweep_workflow(deeper, "demo", "cpu", store="s3://b")


def test_local_runs_execute_the_gpu_profile_when_pytorch_sees_a_gpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import torch

    from shared.registry import create_run
    from shared.store import open_store
    from workflows import commands, local

    store = open_store(tmp_path / "store")
    run_id = create_run(store, load_spec(TINY_SPEC))
    manifests: list[dict[str, Any]] = []
    monkeypatch.setattr(local, "run_workflow", lambda manifest, **_: manifests.append(manifest))

    def device_of_train() -> str:
        args = _templates(manifests[-1])["train"]["container"]["args"]
        return str(args[args.index("--device") + 1])

    for cuda, device in ((True, "auto"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        commands.run_registered(run_id, store.url)
        assert device_of_train() == device
    commands.run_registered(run_id, store.url, profile="gpu")
    assert device_of_train() == "auto"


@pytest.mark.parametrize("module", MODULES)
def test_importing_a_workflow_module_draws_no_run_id(
    module: str, monkeypatch: pytest.MonkeyPatch, schema_validator: Any
) -> None:
    """`hera generate yaml` imports the module: the same text every time, no id drawn."""
    from hera._cli.generate.yaml import load_workflows_from_module

    def no_draw(*_: Any) -> str:
        raise AssertionError("importing a workflow module drew a run id")

    monkeypatch.setattr(layout.secrets, "token_hex", no_draw)
    path = ROOT / "workflows" / f"{module}.py"
    texts = [[yaml.safe_dump(w.to_dict()) for w in load_workflows_from_module(path)] for _ in "ab"]
    assert len(texts[0]) == 1 and texts[0] == texts[1]
    manifest = yaml.safe_load(texts[0][0])
    assert _errors(schema_validator, manifest) == []
    assert manifest["spec"]["arguments"]["parameters"][-1] == {
        "name": "store",
        "value": "s3://driftlab",  # the chart's default store.url: $DRIFTLAB_STORE is unset
    }


def test_hera_cli_renders_a_workflow_module(tmp_path: Path, schema_validator: Any) -> None:
    """The README's `hera generate yaml workflows/gpt2_medium.py`, as a user runs it."""
    hera = Path(sys.executable).parent / "hera"
    if not hera.is_file():
        pytest.fail(f"{hera} is missing: `make install` brings Hera's CLI with driftlab[workflows]")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DRIFTLAB_STORE", None)
    done = subprocess.run(
        [str(hera), "generate", "yaml", "workflows/gpt2_medium.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    manifest = yaml.safe_load(done.stdout)
    assert _errors(schema_validator, manifest) == []
    assert manifest["metadata"]["name"] == "gpt2-medium-20000101-000000-000000"
    assert _fan_out(manifest, "sae-train")[0] == 1
