"""The Dockerfiles, parsed (no Docker engine in CI): shared base, pinned, non-root, and
each image's command is the stage the workflow runs in it."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from shared.spec import RunSpec
from tests.support import ROOT
from workflows.pipeline import Images, build_workflow, compiled

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
    copies = [i.value for i in instructions if i.op == "COPY" and i.value.startswith("services/")]
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


def _pins(path: Path) -> dict[str, str]:
    """name -> exact version of a requirements file; every line must be an `==` pin."""
    pinned = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path.name}: {line}"
            pinned[req.name.lower()] = spec.version
    return pinned


def _ranges(requirements: list[str]) -> dict[str, Requirement]:
    return {
        Requirement(d).name.lower(): Requirement(d)
        for d in requirements
        if Requirement(d).name != "driftlab"
    }


_PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
_EXTRAS: dict[str, list[str]] = _PROJECT["optional-dependencies"]
STAGE_EXTRAS = sorted(set(SERVICES) & set(_EXTRAS))


def _assert_pinned_inside(pinned: dict[str, str], wanted: dict[str, Requirement]) -> None:
    for name, version in pinned.items():
        assert wanted[name].specifier.contains(version, prereleases=True), f"{name}=={version}"


def test_base_pins_every_core_dependency_inside_its_range() -> None:
    wanted = _ranges(_PROJECT["dependencies"])
    pinned = _pins(REQUIREMENTS)
    assert set(pinned) == set(wanted) - {"torch"}, "torch comes from the base image"
    _assert_pinned_inside(pinned, wanted)


@pytest.mark.parametrize("extra", STAGE_EXTRAS)
def test_stage_requirements_pin_exactly_the_stage_extra_inside_its_ranges(extra: str) -> None:
    wanted = _ranges(_EXTRAS[extra])
    pinned = _pins(REQUIREMENTS.with_name(f"requirements-{extra}.txt"))
    assert set(pinned) == set(wanted)
    _assert_pinned_inside(pinned, wanted)
    core = _pins(REQUIREMENTS)
    assert not set(pinned) & set(core), "a core package belongs to the base image only"


def test_a_requirements_file_per_stage_extra_and_one_version_per_package() -> None:
    files = sorted(REQUIREMENTS.parent.glob("requirements-*.txt"))
    assert [f.stem.removeprefix("requirements-") for f in files] == STAGE_EXTRAS
    versions: dict[str, set[str]] = {}
    for f in [REQUIREMENTS, *files]:
        for name, version in _pins(f).items():
            versions.setdefault(name, set()).add(version)
    assert {n: v for n, v in versions.items() if len(v) > 1} == {}


def test_stage_extras_stay_out_of_the_core_and_dev_installs_them_all() -> None:
    core = set(_ranges(_PROJECT["dependencies"]))
    for extra in [*STAGE_EXTRAS, "workflows", "grafana"]:
        assert not core & set(_ranges(_EXTRAS[extra])), extra
    (everything,) = [d for d in _EXTRAS["all"] if Requirement(d).name == "driftlab"]
    assert Requirement(everything).extras == {*STAGE_EXTRAS, "workflows"}
    assert any(
        Requirement(d).name == "driftlab" and "all" in Requirement(d).extras for d in _EXTRAS["dev"]
    )
    # urllib3-future would replace urllib3 for minio: never pulled in by a plain install.
    assert "grafana" not in Requirement(everything).extras


@pytest.mark.parametrize("service", SERVICES)
def test_each_image_installs_exactly_its_stage_extra_on_the_base_pins(service: str) -> None:
    _, instructions = final_stage(ROOT / "services" / service / "Dockerfile", {"TAG": "abc"})
    installs = [i.value for i in instructions if i.op == "RUN" and "pip install" in i.value]
    copied = [i.value for i in instructions if i.op == "COPY" and "requirements" in i.value]
    if service not in STAGE_EXTRAS:
        assert installs == [] and copied == [], "the stage needs nothing beyond the core"
        return
    name = f"requirements-{service}.txt"
    assert copied == [f"deploy/docker/requirements.txt deploy/docker/{name} /tmp/"]
    (install,) = installs
    assert f"-c /tmp/requirements.txt -r /tmp/{name}" in install, "constrained to core pins"
    assert len(re.findall(r"(?:^|\s)-r\s", install)) == 1
    users = [i.value for i in instructions if i.op in ("USER", "RUN")]
    assert users[-1] == "10001:10001", "back to the non-root user after installing"


# Imports every module of services.<stage>, then runs `python -m services.<stage> --help`,
# with each library of an extra the image does not install made unimportable, and each
# service the image does not copy too.
_IMAGE_SIM = """
import importlib, importlib.abc, pkgutil, runpy, sys
blocked, copied, package = sys.argv[1].split(), set(sys.argv[2].split()), sys.argv[3]
argv = sys.argv[4:] or ["--help"]
sys.modules.update(dict.fromkeys(blocked))  # None: `import` fails, find_spec says absent
class Image(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        parts = name.split(".")
        if parts[0] == "services" and len(parts) > 1 and parts[1] not in copied:
            raise ModuleNotFoundError(f"not in the image: {name}", name=name)
        return None
sys.meta_path.insert(0, Image())
for info in pkgutil.walk_packages(getattr(importlib.import_module(package), "__path__", []),
                                  package + "."):
    if not info.name.endswith(".__main__"):
        importlib.import_module(info.name)
sys.argv = [package, *argv]
runpy.run_module(package, run_name="__main__", alter_sys=True)
"""


def _closure(requirements: list[str]) -> set[str]:
    """Normalised names of these distributions and everything they install in turn."""
    todo = [Requirement(d) for d in requirements if Requirement(d).name != "driftlab"]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name.lower())
        if name in seen:
            continue
        seen.add(name)
        for dep in importlib.metadata.requires(req.name) or []:
            dep_req = Requirement(dep)
            if dep_req.marker is None or any(
                dep_req.marker.evaluate({"extra": e}) for e in req.extras or {""}
            ):
                todo.append(dep_req)
    return seen


def _modules_of(distributions: set[str]) -> set[str]:
    """Top-level import names of these (normalised) distribution names."""
    return {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if any(re.sub(r"[-_.]+", "-", d.lower()) in distributions for d in dists)
    }


def _run_in_image(service: str, module: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """`python -m module argv` with only what `service`'s image holds importable."""
    installed = _modules_of(_closure([*_PROJECT["dependencies"], *_EXTRAS.get(service, [])]))
    every_extra = [d for e in (*STAGE_EXTRAS, "workflows") for d in _EXTRAS[e]]
    blocked = _modules_of(_closure(every_extra)) - installed
    assert {"ot", "sklearn", "hmmlearn", "hera"} - installed <= blocked
    blocked |= {"workflows", "cli"}  # the layers above shared/ are in no image
    copied = _imported_services(service)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            _IMAGE_SIM,
            " ".join(sorted(blocked)),
            " ".join(copied),
            module,
            *argv,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.parametrize("service", SERVICES)
def test_each_stage_starts_with_only_its_image_s_libraries_and_code(service: str) -> None:
    """Catches a stage importing a library its extra lacks (or another service's code its
    Dockerfile does not copy): the image would crash at start on the cluster."""
    result = _run_in_image(service, f"services.{service}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


@pytest.mark.parametrize("command", ["checkpoints", "finish"])
def test_the_workflow_s_bookkeeping_tasks_start_in_the_trainer_image(command: str) -> None:
    """list-checkpoints and the exit handler run `python -m shared.bookkeeping` in the
    trainer image, which holds none of the other services' code, workflows/ or the CLI."""
    result = _run_in_image("trainer", "shared.bookkeeping", command, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"usage: python -m shared.bookkeeping {command}" in result.stdout


@pytest.mark.parametrize("service", SERVICES)
def test_every_library_a_stage_imports_is_in_its_image(service: str) -> None:
    """Every import in the stage's code, lazy ones inside functions included (the module
    walk above only runs the top-level ones), names a library the image installs."""
    allowed = _modules_of(_closure([*_PROJECT["dependencies"], *_EXTRAS.get(service, [])]))
    allowed |= set(sys.stdlib_module_names) | {"services", "shared", "torch"}
    missing: set[str] = set()
    for path in (ROOT / "services" / service).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            missing |= {f"{path.name}: {n}" for n in names if n.split(".")[0] not in allowed}
    assert missing == set()


def test_dockerignore_keeps_the_context_to_what_images_copy() -> None:
    lines = [
        ln
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert lines[0] == "**"
    kept = {ln[1:] for ln in lines if ln.startswith("!")}
    assert kept == {"deploy/docker/requirements*.txt", "shared/**", "services/**"}
    copied = {
        source.rstrip("/")
        for path in [BASE, *(ROOT / "services" / s / "Dockerfile" for s in SERVICES)]
        for i in parse(path)
        if i.op == "COPY"
        for source in i.value.split()[:-1]
    }
    for source in copied:
        assert any(source == k.removesuffix("/**") or fnmatch(source, k) for k in kept), source
