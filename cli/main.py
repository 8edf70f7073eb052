"""The `driftlab` command line: the top layer, the only code that imports every other.

Each command is a thin shell over a library function, run by `shared.errors.run_command`:
a mistake of the user's ends as one line and an exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from cli.sweep import add_sweep_parser
from shared import bookkeeping, dashboard_push, dashboards
from shared.errors import DriftlabError, run_command
from shared.registry import add_runs_parser, add_store_argument
from workflows.commands import add_workflow_parsers

Handler = Callable[[argparse.Namespace], int]


def _cmd_spec_validate(args: argparse.Namespace) -> int:
    from shared.memory import NO_MACHINE, check_memory, parse_memory
    from shared.spec import load_spec

    available = NO_MACHINE if args.memory is None else parse_memory(args.memory)
    where = "any one machine has" if args.memory is None else f"--memory {args.memory}"
    failed = 0
    for path in args.specs:  # every file gets its line: one bad spec hides no other's
        try:
            check_memory(load_spec(path), available, where=where)
        except DriftlabError as err:
            message = str(err) if str(err).startswith(f"{path}") else f"{path}: {err}"
            print(f"driftlab: error: {message}", file=sys.stderr)
            failed = max(failed, err.exit_code)
            continue
        print(f"{path}: ok")
    return failed


def _cmd_spec_show(args: argparse.Namespace) -> int:
    from shared.spec import load_spec, spec_to_yaml

    sys.stdout.write(spec_to_yaml(load_spec(args.spec)))
    return 0


def _add_evaluator_parsers(commands: argparse._SubParsersAction) -> None:
    """`report`, `compare`, `hmm`: their code is the evaluator's, imported only when run, so
    the CLI also works in images without it (the trainer image runs `checkpoints`)."""

    def report_handler(args: argparse.Namespace) -> int:
        from services.evaluator.commands import cmd_report

        return cmd_report(args)

    def compare_handler(args: argparse.Namespace) -> int:
        from services.evaluator.commands import cmd_compare

        return cmd_compare(args)

    report = commands.add_parser("report", help="(re)build a run's report and print its path")
    report.add_argument("run_id", metavar="RUN_ID", help="run id")
    report.add_argument("--open", action="store_true", help="open the report in a browser")
    add_store_argument(report)
    report.set_defaults(handler=report_handler)
    compare = commands.add_parser(
        "compare", help="compare runs side by side: print a table and write a comparison page"
    )
    compare.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="run ids (two or more)")
    add_store_argument(compare)
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
    add_store_argument(hmm)
    hmm.add_argument("--max-components", type=int, help="override hmm.max_components")
    hmm.add_argument("--restarts", type=int, help="override hmm.restarts")
    hmm.add_argument("--select-by", choices=("bic", "aic", "loglik"), help="override hmm.select_by")
    hmm.set_defaults(handler=hmm_handler)


def _add_dashboards_parser(commands: argparse._SubParsersAction) -> None:
    """`driftlab dashboards render` and `driftlab dashboards push`."""
    group = commands.add_parser(
        "dashboards", help="Grafana dashboards from the metric declarations"
    )
    sub = group.add_subparsers(dest="dashboards_command", metavar="SUBCOMMAND", required=True)
    dashboards.add_render_parser(sub)
    dashboard_push.add_push_parser(sub)


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
    validate.add_argument(
        "--memory",
        metavar="SIZE",
        help="also refuse a stage whose least memory exceeds SIZE (e.g. 24GiB: the GPU's)",
    )
    validate.set_defaults(handler=_cmd_spec_validate)
    show = spec_cmds.add_parser("show", help="print the fully resolved spec as YAML")
    show.add_argument("spec", metavar="SPEC", help="run spec YAML file")
    show.set_defaults(handler=_cmd_spec_show)

    add_runs_parser(commands)
    add_sweep_parser(commands)
    _add_dashboards_parser(commands)
    bookkeeping.add_parsers(commands)
    _add_evaluator_parsers(commands)
    add_workflow_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    return run_command(handler, args)
