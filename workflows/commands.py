"""`driftlab run` (the graph here) and `driftlab submit` (the graph on a cluster)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

from shared.errors import run_command
from shared.quality import QualityCheck, problems, run_checks, summary
from shared.registry import add_store_argument

if TYPE_CHECKING:
    from hera.workflows import Workflow

    from shared.spec import RunSpec
    from workflows.local import RunResult
    from workflows.pipeline import Profile

LocalProfile = Literal["auto", "gpu", "cpu"]


def add_workflow_parsers(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="run a spec's whole workflow on this machine",
        description="Register SPEC as a run (or reuse --run) and execute its compiled Argo "
        "workflow here, each task a subprocess; prints the run id, each stage's time and "
        "the report's address.",
    )
    run.add_argument("spec", metavar="SPEC.yaml", help="run spec")
    add_store_argument(run)
    run.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="tasks at a time (default: the number of cores, %(default)s)",
    )
    run.add_argument(
        "--run",
        metavar="RUN_ID",
        help="rerun this run id (same spec): finished stages are cached",
    )
    run.add_argument(
        "--profile",
        choices=get_args(LocalProfile),
        default="auto",
        help="auto (default): gpu when PyTorch sees a CUDA device here, else cpu; gpu lets "
        "every stage pick its device, cpu keeps them all on the CPU",
    )
    run.add_argument(
        "--steal",
        action="store_true",
        help="take over the run from a writer that died (its lease has expired)",
    )
    run.set_defaults(handler=_cmd_run)

    submit = commands.add_parser(
        "submit",
        help="submit a workflow module or a spec to Argo",
        description="Build the workflow of WORKFLOW.py (its build function) or SPEC.yaml, "
        "register its runs in the store, and submit it.",
    )
    submit.add_argument("target", metavar="WORKFLOW.py|SPEC.yaml")
    submit.add_argument(
        "--argo-server",
        default=os.environ.get("ARGO_SERVER", ""),
        help="Argo server URL (default $ARGO_SERVER)",
    )
    submit.add_argument(
        "--token",
        default=os.environ.get("ARGO_TOKEN"),
        help="Argo bearer token (default $ARGO_TOKEN)",
    )
    submit.add_argument("--namespace", default=os.environ.get("ARGO_NAMESPACE", "driftlab"))
    submit.add_argument("--via", choices=("argo", "kubernetes"), default="argo")
    submit.add_argument(
        "--profile",
        choices=("auto", "gpu", "cpu"),
        default="auto",
        help="auto: gpu when a node has allocatable nvidia.com/gpu, else cpu",
    )
    submit.add_argument(
        "--store",
        default=None,
        help="store URL the pods use (default $DRIFTLAB_STORE, else the store named by the "
        "ConfigMap driftlab-config the chart installs in --namespace)",
    )
    submit.add_argument(
        "--run",
        metavar="RUN_ID",
        help="resubmit this registered run (same spec; finished stages are cached); refused "
        "while a live writer holds it",
    )
    submit.add_argument("--wait", action="store_true", help="follow the tasks until done")
    submit.add_argument(
        "--dry-run", action="store_true", help="print the workflow YAML; contact nothing"
    )
    submit.set_defaults(handler=_cmd_submit)


def script_main() -> int:
    """`python workflows/<module>.py [submit options]`: the same as `driftlab submit` on it."""
    parser = argparse.ArgumentParser(prog=f"python {sys.argv[0]}")
    add_workflow_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["submit", sys.argv[0], *sys.argv[1:]])
    return run_command(args.handler, args)


def local_profile(choice: LocalProfile) -> Profile:
    """The profile a local run executes: the GPU's when this machine has one."""
    if choice != "auto":
        return choice
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def run_registered(
    run_id: str,
    store_url: str,
    workers: int | None = None,
    profile: LocalProfile = "auto",
    *,
    steal: bool = False,
) -> RunResult:
    """Execute the compiled workflow of a registered run here, holding the run's lease.

    The spec is read back from the store, so the graph is built from what the stages read.
    A second writer of the run is refused (`shared.lease`); `steal` takes over the lease of
    a writer that died.
    """
    from shared.lease import hold_lease
    from shared.stage import load_run_spec
    from shared.store import open_store
    from workflows.pipeline import Cluster, build_workflow

    store_url = _absolute(store_url)
    store = open_store(store_url)
    spec = load_run_spec(store, run_id)
    workflow = build_workflow(
        spec, local_profile(profile), store=store_url, run_id=run_id, cluster=Cluster.local()
    )
    with hold_lease(store, run_id, "driftlab run", steal=steal):
        return _execute_here(workflow, workers)


def run_sweep_registered(
    run_ids: Sequence[str],
    store_url: str,
    sweep_name: str,
    parallelism: int,
    workers: int | None = None,
    profile: LocalProfile = "auto",
) -> RunResult:
    """Execute the compiled sweep workflow of registered runs here, `parallelism` at a time.

    The first failure stops every run, as it stops a single run's workflow. It holds every
    run's lease.
    """
    from shared.lease import hold_lease
    from shared.stage import load_run_spec
    from shared.store import open_store
    from workflows.pipeline import Cluster, build_sweep_workflow

    store_url = _absolute(store_url)
    store = open_store(store_url)
    specs = {run_id: load_run_spec(store, run_id) for run_id in run_ids}
    workflow = build_sweep_workflow(
        specs,
        sweep_name,
        local_profile(profile),
        store=store_url,
        parallelism=parallelism,
        cluster=Cluster.local(),
    )
    with contextlib.ExitStack() as leases:
        for run_id in run_ids:
            leases.enter_context(hold_lease(store, run_id, f"the sweep {sweep_name}"))
        return _execute_here(workflow, workers)


def _execute_here(workflow: Workflow, workers: int | None) -> RunResult:
    """Task states go to stderr: a live table in a terminal, one line per change otherwise."""
    from workflows.local import LineReporter, LiveTable, run_workflow
    from workflows.pipeline import compiled

    live = LiveTable(sys.stderr) if sys.stderr.isatty() else None
    try:
        return run_workflow(
            compiled(workflow), workers=workers, reporter=live or LineReporter(sys.stderr)
        )
    finally:
        if live:
            live.close()


def _cmd_run(args: argparse.Namespace) -> int:
    from shared import layout
    from shared.registry import create_run
    from shared.spec import load_spec
    from shared.store import open_store
    from workflows.local import LocalRunError

    if args.workers < 1:
        raise LocalRunError(f"--workers must be at least 1, got {args.workers}")
    spec = load_spec(args.spec)
    store = open_store(_absolute(args.store))
    run_id = create_run(store, spec, args.run)
    print(run_id, flush=True)
    start = time.monotonic()
    result = run_registered(run_id, args.store, args.workers, args.profile, steal=args.steal)
    sys.stdout.write(_timings(result.nodes))
    print(f"total {time.monotonic() - start:.1f}s", flush=True)
    if not result.ok:
        failed = result.failed
        if failed is not None:
            print(f"{failed.name} {failed.state.lower()}: {failed.message}", file=sys.stderr)
            tail = failed.log_tail()
            if tail:
                print(f"--- last lines of its log ({failed.log}) ---\n{tail}", file=sys.stderr)
        print(
            f"run {run_id} failed; logs in {result.log_dir}; rerun with "
            f"`driftlab run {args.spec} --run {run_id} --store {args.store}` "
            "(finished stages are cached)",
            file=sys.stderr,
        )
        return 1
    shutil.rmtree(result.log_dir, ignore_errors=True)
    _print_problems(run_checks(store, run_id))
    print(f"report: {store.url_of(layout.evaluate_report_html_key(run_id))}")
    return 0


def _print_problems(checks: list[QualityCheck]) -> None:
    """After the stage table, what the run's results should not be trusted for."""
    bad = problems(checks)
    if not checks:
        return
    if not bad:
        print(f"quality: all {len(checks)} checks ok")
        return
    counts = summary(checks)
    print(f"quality: {counts['fail']} fail, {counts['warn']} warn, {counts['ok']} ok")
    for check in bad:
        print(f"  {check.line()}")


def _absolute(url: str) -> str:
    """Tasks may run elsewhere than here: a relative folder store becomes absolute."""
    if "://" in url:
        return url
    return os.path.abspath(url)


def _timings(nodes: list[Any]) -> str:
    """One line per stage: tasks, state and wall time from the first start to the last end."""
    from workflows.local import SUCCEEDED

    stages: dict[str, list[Any]] = {}
    for node in nodes:
        if node.started is not None:
            stages.setdefault(node.template, []).append(node)
    lines = []
    for name, group in stages.items():
        wall = max(n.ended or n.started for n in group) - min(n.started for n in group)
        states = {n.state for n in group}
        state = (
            "succeeded" if states == {SUCCEEDED} else "/".join(sorted(s.lower() for s in states))
        )
        count = f" x{len(group)}" if len(group) > 1 else ""
        lines.append(f"{name + count:<22} {state:<12} {wall:8.1f}s\n")
    return "".join(lines)


def _cmd_submit(args: argparse.Namespace) -> int:
    """Check the cluster, then the store, then register and submit: nothing is written to
    the store before the cluster has answered, so a wrong kubeconfig or Argo address costs
    no registration and no waiting on a store that was never meant."""
    import yaml

    from workflows.pipeline import Cluster, Images, compiled
    from workflows.submission import new_run_ids
    from workflows.submit import (
        check_argo_server,
        check_kubernetes,
        choose_profile,
        follow,
        list_nodes,
        load_builder,
        phase_reader,
        submit_argo,
        submit_kubernetes,
    )

    build = load_builder(args.target)
    if not args.dry_run:
        if args.via == "argo":
            check_argo_server(args.argo_server, args.token, args.namespace)
        else:
            check_kubernetes()
    store_url = _submit_store(args)
    profile = args.profile
    if profile == "auto":
        if args.dry_run:
            profile = "gpu"
            print("dry run: --profile auto renders the gpu profile", file=sys.stderr)
        else:
            profile, why = choose_profile(list_nodes())
            print(why, file=sys.stderr)
    run_ids = new_run_ids if args.run is None else (lambda spec, index: args.run)
    installed = () if args.dry_run else _installed_templates(args)
    submission = build(
        profile,
        store=store_url,
        images=Images.from_environment(),
        cluster=Cluster(namespace=args.namespace),
        run_ids=run_ids,
        installed=installed,
    )
    manifest = compiled(submission.workflow)
    if args.dry_run:
        sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False))
        return 0
    if submission.refs is not None:
        print(
            f"using the chart's WorkflowTemplates {', '.join(sorted(submission.refs.values()))}",
            file=sys.stderr,
        )
    else:
        print(
            f"templates inlined: namespace {args.namespace} holds no WorkflowTemplates "
            "versioned for this spec's resources and profile (the chart installs those of "
            "its profile's spec)",
            file=sys.stderr,
        )
    _register(submission.specs, store_url, args.run)
    if args.via == "argo":
        name = submit_argo(manifest, args.argo_server, args.token, args.namespace)
        where = f"{args.argo_server.rstrip('/')}/workflows/{args.namespace}/{name}"
    else:
        name = submit_kubernetes(manifest, args.namespace)
        where = (
            f"`argo get -n {args.namespace} {name}` (Argo UI: /workflows/{args.namespace}/{name})"
        )
    print(name, flush=True)
    print(f"submitted {name} ({profile} profile, store {store_url}): {where}", file=sys.stderr)
    if not args.wait:
        return 0
    phase = follow(name, phase_reader(args.via, args.argo_server, args.token, args.namespace))
    print(f"{name} {phase.lower()}", file=sys.stderr)
    return 0 if phase == "Succeeded" else 1


def _installed_templates(args: argparse.Namespace) -> list[str]:
    """The WorkflowTemplates the stage tasks could reference; none when they cannot be
    listed (RBAC may forbid it), since inlined templates run just the same."""
    from workflows.submit import SubmitError, installed_templates

    try:
        return installed_templates(args.via, args.argo_server, args.token, args.namespace)
    except SubmitError as err:
        print(f"{err}: inlining the templates", file=sys.stderr)
        return []


def _submit_store(args: argparse.Namespace) -> str:
    """--store, else $DRIFTLAB_STORE, else the store of the chart installed in the namespace.

    Never a guess: a cluster run's artifacts must land where its pods can reach them.
    """
    from workflows.submit import CHART_CONFIGMAP, SubmitError, chart_store

    given = args.store or os.environ.get("DRIFTLAB_STORE")
    if given:
        return str(given)
    if args.dry_run:
        raise SubmitError(
            "no store: pass --store URL or set $DRIFTLAB_STORE (a dry run reads nothing from "
            "the cluster)"
        )
    found = chart_store(args.namespace)
    if found is None:
        raise SubmitError(
            f"no store: pass --store URL, set $DRIFTLAB_STORE, or install the driftlab chart "
            f"in namespace {args.namespace} (its ConfigMap {CHART_CONFIGMAP} names the store)"
        )
    print(f"store {found} (ConfigMap {args.namespace}/{CHART_CONFIGMAP})", file=sys.stderr)
    return found


def _register(specs: Mapping[str, RunSpec], store_url: str, resubmitted: str | None) -> None:
    """Write every run's spec before a pod can look for it; a resubmitted run must exist,
    keep its spec, and have no live writer (a `driftlab run` of it here, say)."""
    from shared import layout
    from shared.lease import refuse_if_held
    from shared.registry import create_run
    from shared.store import open_store
    from workflows.submit import SubmitError

    store = open_store(store_url)
    if resubmitted is not None:
        if not store.exists(layout.spec_key(resubmitted)):
            raise SubmitError(
                f"run {resubmitted} is not registered in {store_url}: leave out --run to "
                "register a new run, or pass the --store it lives in"
            )
        refuse_if_held(store, resubmitted)
    for run_id, spec in specs.items():
        create_run(store, spec, run_id)
