"""The Dockerfiles, parsed (no Docker engine in CI): shared base, pinned, non-root, and
each image's command is the stage the workflow runs in it."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from shared.spec import RunSpec
from workflows.pipeline import Images, build_workflow, compiled

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "docker" / "base.Dockerfile"
REQUIREMENTS = ROOT / "deploy" / "docker" / "requirements.txt"
SERVICES = ("trainer", "extractor", "ot", "sae", "evaluator")
_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass(frozen=True)
class Instruction:
    op: str
    value: str


def parse(path: Path) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, value = line.partition(" ")
            out.append(Instruction(op.upper(), value.strip()))
    return out


def expand(value: str, args: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in args, f"${name} has no ARG default"
        return args[name]

    return _VAR.sub(sub, value)


def stages(
    path: Path, build_args: dict[str, str]
) -> list[tuple[str, str | None, list[Instruction]]]:
    """(resolved FROM image, stage alias, instructions) per build stage."""
    args: dict[str, str] = {}
    out: list[tuple[str, str | None, list[Instruction]]] = []
    for ins in parse(path):
        if ins.op == "ARG" and not out:  # global ARGs: usable in FROM
            name, _, default = ins.value.partition("=")
            args[name] = build_args.get(name, default)
        elif ins.op == "FROM":
            image, _, alias = ins.value.partition(" AS ")
            out.append((expand(image.strip(), args), alias.strip() or None, []))
        elif out:
            out[-1][2].append(ins)
    return out


def final_stage(path: Path, build_args: dict[str, str]) -> tuple[str, list[Instruction]]:
    """The image a build produces, following FROM <alias> back through earlier stages."""
    all_stages = stages(path, build_args)
    image, _, instructions = all_stages[-1]
    chain = list(instructions)
    aliases = {alias: (img, ins) for img, alias, ins in all_stages if alias}
    while image in aliases:
        image, earlier = aliases[image]
        chain = earlier + chain
    return image, chain


def _user(instructions: list[Instruction]) -> str:
    users = [i.value for i in instructions if i.op == "USER"]
    assert users, "no USER: the image would run as root"
    return users[-1]


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_base_is_pinned_and_runs_as_a_numeric_non_root_user(variant: str) -> None:
    image, instructions = final_stage(BASE, {"VARIANT": variant})
    repo, _, tag = image.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), image
    assert repo == ("pytorch/pytorch" if variant == "gpu" else "python"), image
    user = _user(instructions).split(":")
    assert all(part.isdigit() and int(part) > 0 for part in user), "numeric uid/gid, not root"
    env = " ".join(i.value for i in instructions if i.op == "ENV")
    assert "HOME=/tmp" in env and "PYTHONDONTWRITEBYTECODE=1" in env  # read-only root fs


def test_both_variants_carry_the_same_torch() -> None:
    gpu, _ = final_stage(BASE, {"VARIANT": "gpu"})
    _, cpu = final_stage(BASE, {"VARIANT": "cpu"})
    default = next(
        i.value for i in parse(BASE) if i.op == "ARG" and i.value.startswith("TORCH_VERSION=")
    )
    version = default.split("=", 1)[1]
    assert gpu.startswith(f"pytorch/pytorch:{version}-")
    assert any('"torch==${TORCH_VERSION}"' in i.value for i in cpu if i.op == "RUN")


@pytest.fixture(scope="module")
def workflow_modules() -> dict[str, set[str]]:
    """service -> the Python modules the workflow runs in that service's image."""
    manifest = compiled(build_workflow(RunSpec(), "gpu", store="s3://b", images=Images()))
    out: dict[str, set[str]] = {}
    for t in manifest["spec"]["templates"]:
        if "container" in t:
            service = t["container"]["image"].split("/driftlab-")[1].split(":")[0]
            command = t["container"]["command"]
            assert command[:2] == ["python", "-m"]
            out.setdefault(service, set()).add(command[2])
    return out


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_service_image_builds_from_the_shared_base(service: str, variant: str) -> None:
    path = ROOT / "services" / service / "Dockerfile"
    image, instructions = final_stage(path, {"VARIANT": variant, "TAG": "abc"})
    assert image == f"driftlab/driftlab-base:abc-{variant}"
    copies = [i.value for i in instructions if i.op == "COPY"]
    needed = sorted(_imported_services(service))
    assert copies == [f"services/{s}/ /app/services/{s}/" for s in needed], (
        "exactly the stage's code and the services it imports"
    )
    assert _user(instructions) == "10001:10001"


def _imported_services(service: str) -> set[str]:
    """The service itself and every other service its code imports (e.g. the evaluator
    loads SAEs through services.sae), so an image never misses a module it needs."""
    pattern = re.compile(r"^\s*(?:from|import)\s+services\.(\w+)", re.MULTILINE)
    found = {service}
    for path in (ROOT / "services" / service).rglob("*.py"):
        found |= set(pattern.findall(path.read_text()))
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_service_command_is_the_stage_the_workflow_runs_in_it(
    service: str, workflow_modules: dict[str, set[str]]
) -> None:
    instructions = parse(ROOT / "services" / service / "Dockerfile")
    (entrypoint,) = [json.loads(i.value) for i in instructions if i.op == "ENTRYPOINT"]
    assert entrypoint == ["python", "-m", f"services.{service}"]
    assert f"services.{service}" in workflow_modules[service]


def test_every_image_the_workflow_uses_has_a_dockerfile(
    workflow_modules: dict[str, set[str]],
) -> None:
    assert set(workflow_modules) <= set(SERVICES)


def test_requirements_pin_every_runtime_dependency_inside_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(d).name.lower(): Requirement(d) for d in project["dependencies"]}
    pinned = {}
    for line in REQUIREMENTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pinned[req.name.lower()] = spec.version
    assert set(pinned) == set(wanted) - {"torch"}, "torch comes from the base image"
    for name, version in pinned.items():
        assert wanted[name].specifier.contains(version, prereleases=True), f"{name}=={version}"


def test_dockerignore_keeps_the_context_to_what_images_copy() -> None:
    lines = [
        ln
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert lines[0] == "**"
    kept = {ln[1:] for ln in lines if ln.startswith("!")}
    assert kept == {"deploy/docker/requirements.txt", "shared/**", "workflows/**", "services/**"}
    copied = {
        i.value.split()[0].rstrip("/")
        for path in [BASE, *(ROOT / "services" / s / "Dockerfile" for s in SERVICES)]
        for i in parse(path)
        if i.op == "COPY"
    }
    for source in copied:
        assert any(
            source == k.removesuffix("/**") or source.startswith(k.removesuffix("**")) for k in kept
        ), source
