"""The `driftlab` command line.

Each command is a thin shell over a library function; every `DriftlabError` ends as one
line on stderr and its exit code, so users never see a traceback for a mistake of theirs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from shared.errors import DriftlabError

Handler = Callable[[argparse.Namespace], int]


def _cmd_spec_validate(args: argparse.Namespace) -> int:
    from shared.spec import load_spec

    for path in args.specs:
        load_spec(path)
        print(f"{path}: ok")
    return 0


def _cmd_spec_show(args: argparse.Namespace) -> int:
    from shared.spec import load_spec, spec_to_yaml

    sys.stdout.write(spec_to_yaml(load_spec(args.spec)))
    return 0


def _cmd_checkpoints(args: argparse.Namespace) -> int:
    """The JSON list of checkpoint steps to extract: the workflow's fan-out over steps."""
    import json

    from shared import layout
    from shared.stage import load_run_spec
    from shared.steps import selected_steps
    from shared.store import open_store

    store = open_store(args.store)
    run_id = layout.validate_run_id(args.run)
    print(json.dumps(selected_steps(store, run_id, load_run_spec(store, run_id), args.store)))
    return 0


def _cmd_finish(args: argparse.Namespace) -> int:
    """The workflow's exit handler; a Pushgateway it cannot reach only earns a warning."""
    from shared.run_outcome import (
        delete_pushgateway_groups,
        gateway_from_environment,
        record_outcome,
    )
    from shared.store import open_store

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


def _add_run_store(parser: argparse.ArgumentParser, *, many: bool = False) -> None:
    from shared.registry import _add_store_argument

    parser.add_argument(
        "--run",
        required=True,
        action="append" if many else "store",
        metavar="RUN_ID",
        help="run id" + (" (repeatable)" if many else ""),
    )
    _add_store_argument(parser)


def _add_evaluator_parsers(commands: argparse._SubParsersAction) -> None:
    """`report`, `compare`, `hmm`: their code is the evaluator's, imported only when run, so
    the CLI also works in images without it (the trainer image runs `checkpoints`)."""
    from shared.registry import _add_store_argument

    def report_handler(args: argparse.Namespace) -> int:
        from services.evaluator.commands import cmd_report

        return cmd_report(args)

    def compare_handler(args: argparse.Namespace) -> int:
        from services.evaluator.commands import cmd_compare

        return cmd_compare(args)

    report = commands.add_parser("report", help="(re)build a run's report and print its path")
    report.add_argument("run_id", metavar="RUN_ID", help="run id")
    report.add_argument("--open", action="store_true", help="open the report in a browser")
    _add_store_argument(report)
    report.set_defaults(handler=report_handler)
    compare = commands.add_parser(
        "compare", help="compare runs side by side: print a table and write a comparison page"
    )
    compare.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="run ids (two or more)")
    _add_store_argument(compare)
    compare.set_defaults(handler=compare_handler)

    def hmm_handler(args: argparse.Namespace) -> int:
        from services.evaluator.hmm_command import cmd_hmm

        return cmd_hmm(args)

    hmm = commands.add_parser(
        "hmm",
        help="fit an HMM of training phases to runs' training dynamics",
        description="Gaussian HMMs with 1..hmm.max_components states on the z-scored "
        "training dynamics of the runs; saves models, states, transition graph and curves "
        "under evaluate/hmm/ of every run.",
    )
    which = hmm.add_mutually_exclusive_group(required=True)
    which.add_argument("--runs", nargs="+", metavar="RUN_ID", help="run ids")
    which.add_argument("--sweep", metavar="NAME", help="every run tagged run.tags.sweep=NAME")
    _add_store_argument(hmm)
    hmm.add_argument("--max-components", type=int, help="override hmm.max_components")
    hmm.add_argument("--restarts", type=int, help="override hmm.restarts")
    hmm.add_argument("--select-by", choices=("bic", "aic", "loglik"), help="override hmm.select_by")
    hmm.set_defaults(handler=hmm_handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="driftlab",
        description="Representation drift, training phases and SAE-based hallucination "
        "detection for GPT-2-style transformers.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    spec = commands.add_parser("spec", help="validate or show a run spec")
    spec_cmds = spec.add_subparsers(dest="spec_command", metavar="SUBCOMMAND", required=True)
    validate = spec_cmds.add_parser("validate", help="check one or more run specs")
    validate.add_argument("specs", nargs="+", metavar="SPEC", help="run spec YAML file(s)")
    validate.set_defaults(handler=_cmd_spec_validate)
    show = spec_cmds.add_parser("show", help="print the fully resolved spec as YAML")
    show.add_argument("spec", metavar="SPEC", help="run spec YAML file")
    show.set_defaults(handler=_cmd_spec_show)

    from shared.dashboards import add_dashboards_parser
    from shared.registry import add_runs_parser
    from shared.sweep import add_sweep_parser

    add_runs_parser(commands)
    add_sweep_parser(commands)
    add_dashboards_parser(commands)

    checkpoints = commands.add_parser(
        "checkpoints",
        help="print the JSON list of a run's checkpoint steps selected by extract.steps",
    )
    _add_run_store(checkpoints)
    checkpoints.set_defaults(handler=_cmd_checkpoints)
    finish = commands.add_parser(
        "finish",
        help="record a run's final workflow status and clear its Pushgateway groups "
        "(the workflow's exit handler)",
    )
    _add_run_store(finish, many=True)
    finish.add_argument("--status", required=True, help="Argo's workflow.status")
    finish.set_defaults(handler=_cmd_finish)
    _add_evaluator_parsers(commands)

    from workflows.commands import add_workflow_parsers

    add_workflow_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except DriftlabError as err:
        print(f"driftlab: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("driftlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
