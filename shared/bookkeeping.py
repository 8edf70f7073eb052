"""The pipeline's two bookkeeping tasks: the checkpoint listing and the exit handler.

`python -m shared.bookkeeping checkpoints|finish --run RUN_ID --store URL`. They only read
and write a few small objects, so they run in the trainer's image, which holds `shared/`
and nothing of the orchestration; `driftlab checkpoints` and `driftlab finish` are the same
commands (`add_parsers`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from shared import layout
from shared.errors import run_command
from shared.registry import add_store_argument
from shared.run_outcome import delete_pushgateway_groups, gateway_from_environment, record_outcome
from shared.stage import load_run_spec
from shared.steps import selected_steps
from shared.store import open_store


def cmd_checkpoints(args: argparse.Namespace) -> int:
    """The JSON list of checkpoint steps to extract: the workflow's fan-out over steps."""
    store = open_store(args.store)
    run_id = layout.validate_run_id(args.run)
    print(json.dumps(selected_steps(store, run_id, load_run_spec(store, run_id), args.store)))
    return 0


def cmd_finish(args: argparse.Namespace) -> int:
    """The workflow's exit handler; a Pushgateway it cannot reach only earns a warning."""
    store = open_store(args.store)
    gateway = gateway_from_environment()
    for run_id in args.run:
        record_outcome(store, run_id, args.status)
        cleared = ""
        if gateway:
            try:
                count = delete_pushgateway_groups(gateway, run_id)
                cleared = f"; {count} Pushgateway groups deleted"
            except (OSError, ValueError) as err:
                cleared = f"; could not clear the Pushgateway at {gateway} ({err})"
        print(f"{run_id}: workflow {args.status.lower()}{cleared}", file=sys.stderr)
    return 0


def add_run_store(parser: argparse.ArgumentParser, *, many: bool = False) -> None:
    """`--run RUN_ID` (repeatable when `many`) and `--store URL`."""
    parser.add_argument(
        "--run",
        required=True,
        action="append" if many else "store",
        metavar="RUN_ID",
        help="run id" + (" (repeatable)" if many else ""),
    )
    add_store_argument(parser)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """The `checkpoints` and `finish` subcommands, with `handler` set."""
    checkpoints = commands.add_parser(
        "checkpoints",
        help="print the JSON list of a run's checkpoint steps selected by extract.steps",
    )
    add_run_store(checkpoints)
    checkpoints.set_defaults(handler=cmd_checkpoints)
    finish = commands.add_parser(
        "finish",
        help="record a run's final workflow status and clear its Pushgateway groups "
        "(the workflow's exit handler)",
    )
    add_run_store(finish, many=True)
    finish.add_argument("--status", required=True, help="Argo's workflow.status")
    finish.set_defaults(handler=cmd_finish)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.bookkeeping", description=__doc__.splitlines()[0]
    )
    add_parsers(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return run_command(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
