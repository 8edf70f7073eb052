"""`driftlab sweep BASE.yaml SWEEP.yaml`: register a sweep's runs, and with --local run them here.

The sweep itself (its file format, grid and random points, the specs they expand to) is
`shared.sweep`; this is its command line, which runs the registered runs through the
workflow's local runner (`workflows.commands`), so it belongs to the top layer.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from shared.registry import add_store_argument
from shared.runs_table import render
from shared.sweep import DEFAULT_MAX_RUNS, expand, load_sweep, points

# -- running here ------------------------------------------------------------------------


def run_local(run_id: str, store_url: str) -> int:
    """Carry one registered run through its whole workflow here; 0 or 1.

    The compiled Argo graph runs under the local runner (workflows/local/), exactly
    as `driftlab run` does; task states go to stderr, so the sweep's stdout stays run ids.
    """
    from workflows.commands import run_registered

    result = run_registered(run_id, store_url)
    if result.failed is not None:
        print(
            f"{run_id}: {result.failed.name} {result.failed.state.lower()}: "
            f"{result.failed.message}; logs in {result.log_dir}",
            file=sys.stderr,
        )
    return 0 if result.ok else 1


def _run_all_local(run_ids: list[str], store_url: str) -> int:
    """Each run after the other; a failed run does not stop the next ones."""
    results = []
    for i, run_id in enumerate(run_ids, 1):
        print(f"[{i}/{len(run_ids)}] {run_id}", file=sys.stderr, flush=True)
        start = time.monotonic()
        code = run_local(run_id, store_url)
        results.append(
            {
                "run_id": run_id,
                "state": "succeeded" if code == 0 else "failed",
                "seconds": round(time.monotonic() - start, 1),
            }
        )
    sys.stderr.write(render(results, ["run_id", "state", "seconds"], "table"))
    failed = sum(r["state"] != "succeeded" for r in results)
    if failed:
        print(f"{failed} of {len(run_ids)} runs failed", file=sys.stderr)
        return 1
    return 0


# -- command line ------------------------------------------------------------------------


def add_sweep_parser(commands: Any) -> None:
    """`driftlab sweep BASE.yaml SWEEP.yaml`: register (and with --local, run) a sweep."""
    sweep = commands.add_parser(
        "sweep",
        help="register one run per point of a grid or random sweep",
        description="Expand SWEEP.yaml over BASE.yaml into one run per point, each tagged "
        "run.tags.sweep=NAME; prints the run ids, one per line.",
    )
    sweep.add_argument("base", metavar="BASE.yaml", help="run spec every point starts from")
    sweep.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file (see configs/sweeps/)")
    add_store_argument(sweep)
    mode = sweep.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run", action="store_true", help="print each run's parameters; write nothing"
    )
    mode.add_argument(
        "--local", action="store_true", help="then run the runs here, one after another"
    )
    sweep.add_argument(
        "--max-runs",
        type=_positive_int,
        default=DEFAULT_MAX_RUNS,
        metavar="N",
        help="refuse sweeps of more than N runs (default %(default)s)",
    )
    sweep.set_defaults(handler=_cmd_sweep)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _cmd_sweep(args: argparse.Namespace) -> int:
    from shared.registry import RegistryError, create_run, load_rows
    from shared.spec import load_spec
    from shared.store import open_store

    sweep = load_sweep(args.sweep)
    specs = expand(load_spec(args.base), sweep, args.max_runs)
    summary = f"sweep {sweep.name}: {sweep.describe_size()} over {args.base}"
    if args.dry_run:
        rows = [{"sweep_index": i, **point} for i, point in enumerate(points(sweep, args.max_runs))]
        sys.stdout.write(render(rows, ["sweep_index", *sweep.parameters], "table"))
        print(f"{summary}; dry run, nothing written", file=sys.stderr)
        return 0
    store = open_store(args.store)
    # A sweep's runs are found by its name; a second sweep under it would mix with the first.
    taken = [r["run_id"] for r in load_rows(store) if r.get("run.tags.sweep") == sweep.name]
    if taken:
        raise RegistryError(
            f"{store.url} already has {len(taken)} run(s) of sweep {sweep.name} (e.g. "
            f"{taken[0]}); give this sweep another name in {sweep.source}"
        )
    run_ids = []
    for spec in specs:
        run_ids.append(create_run(store, spec))
        print(run_ids[-1], flush=True)
    print(
        f"{summary}: registered in {store.url}; "
        f"list them: driftlab runs --filter run.tags.sweep={sweep.name}",
        file=sys.stderr,
    )
    return _run_all_local(run_ids, args.store) if args.local else 0
