"""The contract every `python -m services.<stage>` follows.

A stage reads the run's spec from the store, checks that the stages it reads from have
finished (their DONE markers, and the sizes of the artifacts those list), and skips all
work when its own DONE marker already holds the digests of the same inputs and spec
sections and every artifact it lists is still the one the stage wrote (`shared.done`):
that is what makes reruns and Argo retries cheap and safe, and never a success on damaged
files. Its DONE marker is written last, so a stage killed halfway leaves none and a rerun
redoes it. Progress and outcome go to `status/<stage>[-<shard>].json`,
one object per shard, so fan-out pods never write the same object.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared import layout
from shared.done import (
    DONE_FORMAT,
    RecordingStore,
    Vouched,
    check_listed,
    listed_artifacts,
    marker_problem,
    parse_marker,
)
from shared.errors import ArtifactNotFound, DriftlabError, InputMissing
from shared.lease import ORCHESTRATED_ENV, hold_lease
from shared.log import configure_logging, get_logger
from shared.memory import check_memory, device_memory
from shared.quality import QualityCheck, from_status, with_shard
from shared.spec import RunSpec, parse_spec, section_digest
from shared.store import DEFAULT_STORE_URL, Store, open_store


class Terminated(BaseException):
    """SIGTERM (Kubernetes stopping the pod) turned into an exception, so status is written."""


@dataclass(frozen=True)
class Input:
    """A DONE marker this stage needs, and the command that would produce it."""

    done_key: str
    produced_by: str


@dataclass
class StageContext:
    """Everything a stage's `run` function gets: no globals, no Argo."""

    stage: str
    run_id: str
    shard: str | None
    #: Records what the stage writes, for its DONE marker (`shared.done`).
    store: RecordingStore
    spec: RunSpec
    args: argparse.Namespace
    device: str
    headline: dict[str, Any] = field(default_factory=dict)
    quality: list[QualityCheck] = field(default_factory=list)

    def judge(self, *checks: QualityCheck) -> None:
        """Record verdicts on this stage's output (status, report, gauge); log the bad ones."""
        for check in with_shard(checks, self.shard):
            self.quality.append(check)
            if check.verdict != "ok":
                self.log.warning("quality %s", check.line())

    @property
    def log(self) -> Any:
        return get_logger(self.stage, self.run_id, self.shard)

    def progress(self, total: int | None, **kwargs: Any) -> Any:
        """A telemetry progress tracker labelled with this stage, run and shard."""
        from shared.telemetry import progress

        return progress(
            stage=self.stage, total=total, run_id=self.run_id, shard=self.shard, **kwargs
        )


@dataclass(frozen=True)
class StageDef:
    """One stage (or one subcommand of a service) described as data.

    `inputs` and `done_key` receive the parsed arguments and the spec, because fan-out
    stages (one checkpoint, one layer) depend on which shard they are. A fan-out stage
    started without its shard argument runs once per shard that `fan_out` lists, each
    under the full contract (its own DONE marker, cache check and status), so a local
    run does one after the other what Argo does in parallel pods. `run` may be given as
    "module:function", imported only when the stage has work to do: a cached stage then
    never imports PyTorch, and an Argo retry or a rerun of a finished run costs a second.
    """

    name: str
    help: str
    run: Callable[[StageContext], None] | str
    done_key: Callable[[argparse.Namespace, RunSpec], str]
    inputs: Callable[[argparse.Namespace, RunSpec, Store], Sequence[Input]]
    spec_sections: tuple[str, ...]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    shard: Callable[[argparse.Namespace], str | None] = lambda _args: None
    fan_out: Callable[[argparse.Namespace, RunSpec, Store], Sequence[argparse.Namespace]] | None = (
        None
    )
    #: The subcommand that starts it, when it differs from `name` (`python -m services.sae
    #: train` is stage `sae`, so its status objects are `status/sae-layer-LL.json`).
    subcommand: str | None = None


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_ID", help="run id")
    parser.add_argument(
        "--store",
        default=os.environ.get("DRIFTLAB_STORE", DEFAULT_STORE_URL),
        metavar="URL",
        help="store URL: a path, file:///abs/path or s3://bucket/prefix "
        "(default $DRIFTLAB_STORE or %(default)s)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto picks CUDA when present (default: auto)",
    )
    parser.add_argument(
        "--force", action="store_true", help="redo the work even if it is already done"
    )


def resolve_device(requested: str) -> str:
    """Device is a setting, not a code path: every stage calls this and nothing else."""
    if requested == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise DriftlabError("--device cuda was asked for but no CUDA device is available")
    return "cpu"


def is_primary_process() -> bool:
    """Under torchrun every rank runs the stage; only rank 0 writes status and DONE."""
    return int(os.environ.get("RANK", "0")) == 0


def digest_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def load_run_spec(store: Store, run_id: str) -> RunSpec:
    key = layout.spec_key(run_id)
    try:
        text = store.get_text(key)
    except ArtifactNotFound:
        raise InputMissing(
            f"run {run_id!r} has no spec at {store.url_of(key)}: start it with "
            "`driftlab run SPEC.yaml` (or check --run and --store)"
        ) from None
    return parse_spec(text, source=store.url_of(key))


def check_inputs(
    store: Store, stage: str, inputs: Sequence[Input]
) -> tuple[dict[str, str], dict[str, Vouched]]:
    """Digest of each input's DONE marker, after checking the sizes of what it lists, and
    what each listed object must hash to when the stage reads it (`RecordingStore`).

    A missing, unreadable or damaged input is one InputMissing naming the file and the
    command that redoes its producer (whose own cache check then sees the damage), never
    a stage run on damaged inputs. An input marker listing nothing (written before DONE
    format 2) is taken for its existence, as it always was (see `shared.done`).
    """
    digests: dict[str, str] = {}
    vouched: dict[str, Vouched] = {}
    for item in inputs:
        url = store.url_of(item.done_key)
        try:
            data = store.get_bytes(item.done_key)
        except ArtifactNotFound:
            raise InputMissing(
                f"{stage}: input {url} is not there yet; run `{item.produced_by}` first"
            ) from None
        marker = parse_marker(data)
        problem = f"{url} is unreadable (empty or not a JSON object)" if marker is None else None
        artifacts = None if marker is None else listed_artifacts(marker)
        if artifacts is not None:
            problem = check_listed(store, artifacts, digests=False)
            for key, entry in artifacts.items():
                vouched[key] = Vouched(entry["sha256"], item.produced_by)
        if problem:
            raise InputMissing(f"{stage}: input {problem}; run `{item.produced_by}` to redo it")
        digests[item.done_key] = digest_bytes(data)
    return digests, vouched


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _StatusWriter:
    """Writes this shard's status object; the registry aggregates them."""

    def __init__(self, store: Store, run_id: str, stage: str, shard: str | None) -> None:
        self.store = store
        self.key = layout.status_key(run_id, stage, shard)
        self.base: dict[str, Any] = {
            "stage": stage,
            "shard": shard,
            "run_id": run_id,
            "host": socket.gethostname(),
            "started_at": _now(),
        }
        self.t0 = time.monotonic()

    def write(self, state: str, **fields: Any) -> None:
        if not is_primary_process():
            return
        body = {**self.base, "state": state, **fields}
        if state != "running":
            body["ended_at"] = _now()
            body["duration_seconds"] = round(time.monotonic() - self.t0, 3)
        self.store.put_json(self.key, body)


def execute(stage: StageDef, args: argparse.Namespace) -> int:
    """Run one stage under the contract; returns the process exit code."""
    run_id = layout.validate_run_id(args.run)
    shard = stage.shard(args)
    log = get_logger(stage.name, run_id, shard)
    store = open_store(args.store)
    spec = load_run_spec(store, run_id)
    input_markers, vouched = check_inputs(store, stage.name, stage.inputs(args, spec, store))
    digests = {
        "inputs": input_markers,
        "spec": {s: section_digest(spec, s) for s in stage.spec_sections},
    }
    done_key = stage.done_key(args, spec)
    status = _StatusWriter(store, run_id, stage.name, shard)

    if not args.force and _is_cached(store, done_key, digests, log):
        status.write("cached", done=done_key, **_earlier_verdicts(store, status.key))
        log.info("cached: %s is up to date", done_key)
        return 0

    device = resolve_device(args.device)
    available = device_memory(device)
    if available is not None:  # before a byte of the stage's work is allocated
        check_memory(spec, available, [stage.name], where=f"this machine's {device} has")
    # Whatever was there was made from other inputs (or --force): it must not survive a
    # crash of this attempt.
    if is_primary_process():
        store.delete(done_key)
    status.write("running", device=device)
    recorder = RecordingStore(
        store, layout.run_prefix(run_id), skip=(layout.status_prefix(run_id),), inputs=vouched
    )
    ctx = StageContext(stage.name, run_id, shard, recorder, spec, args, device)
    try:
        _resolve(stage.run)(ctx)
    except BaseException as err:
        message = _one_line(err)
        status.write(
            "failed", device=device, error=message, headline=ctx.headline,
            quality=[c.to_json() for c in ctx.quality],
        )  # fmt: skip
        if isinstance(err, DriftlabError):
            raise  # stage_main prints it: one line, no traceback
        if isinstance(err, KeyboardInterrupt | SystemExit | Terminated):
            raise
        log.error("failed: %s\n%s", message, traceback.format_exc())
        return 1
    marker = {
        "format": DONE_FORMAT,
        "stage": stage.name,
        "shard": shard,
        "run_id": run_id,
        "finished_at": _now(),
        **digests,
        "artifacts": recorder.artifacts(),
    }
    status.write(
        "succeeded", device=device, headline=ctx.headline, done=done_key,
        quality=[c.to_json() for c in ctx.quality],
    )  # fmt: skip
    _push_verdicts(ctx)
    if is_primary_process():
        store.put_json(done_key, marker)
    log.info("done in %.1fs", time.monotonic() - status.t0)
    return 0


def _earlier_verdicts(store: Store, status_key: str) -> dict[str, Any]:
    """A cached stage keeps the headline and verdicts of the run that did the work."""
    try:
        earlier = store.get_json(status_key)
    except (ArtifactNotFound, DriftlabError, ValueError):
        return {}
    if not isinstance(earlier, dict):
        return {}
    kept: dict[str, Any] = {}
    if isinstance(earlier.get("headline"), dict):
        kept["headline"] = earlier["headline"]
    checks = from_status(earlier)
    if checks:
        kept["quality"] = [c.to_json() for c in checks]
    return kept


def _push_verdicts(ctx: StageContext) -> None:
    """One `driftlab_quality_verdict` gauge per check: 0 ok, 1 warn, 2 fail."""
    from shared.telemetry import push_metrics

    for check in ctx.quality:
        push_metrics(
            ctx.stage, ctx.run_id, {"driftlab_quality_verdict": check.severity},
            shard=ctx.shard, labels={"check": check.check},
        )  # fmt: skip


def _is_cached(store: Store, done_key: str, digests: Mapping[str, Any], log: Any) -> bool:
    """Same inputs and spec, and every artifact the marker lists intact (`shared.done`).

    A missing marker is plainly not done; one that is unreadable, of an older format or
    vouching for damaged files is not done either, and the reason is logged with the URL,
    so the redo that follows is explained rather than silent.
    """
    try:
        marker = parse_marker(store.get_bytes(done_key))
    except ArtifactNotFound:
        return False
    if (
        marker is not None
        and marker.get("format") == DONE_FORMAT
        and (marker.get("inputs") != digests["inputs"] or marker.get("spec") != digests["spec"])
    ):
        return False  # other inputs or spec: the ordinary redo, nothing to warn about
    problem = marker_problem(store, done_key, marker)
    if problem:
        log.warning("redoing the work: %s", problem)
    return problem is None


def _resolve(run: Callable[[StageContext], None] | str) -> Callable[[StageContext], None]:
    """A `run` given as "module:function" is imported only when there is work to do."""
    if not isinstance(run, str):
        return run
    module, _, name = run.partition(":")
    function: Callable[[StageContext], None] = getattr(importlib.import_module(module), name)
    return function


def _one_line(err: BaseException) -> str:
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if isinstance(err, Terminated):
        return "terminated by SIGTERM"
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(err, DriftlabError) else f"{type(err).__name__}: {first}"


def stage_main(
    stages: StageDef | Sequence[StageDef], argv: Sequence[str] | None = None, prog: str = ""
) -> int:
    """Entry point of `python -m services.<stage>`: one stage, or subcommands of a service.

    A bad spec, a missing input or an unreachable store ends as one line on stderr and a
    non-zero exit code, never a traceback.
    """
    parser = argparse.ArgumentParser(prog=prog or None)
    if isinstance(stages, StageDef):
        _configure(parser, stages)
    else:
        sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
        for stage in stages:
            _configure(sub.add_parser(stage.subcommand or stage.name, help=stage.help), stage)
    args = parser.parse_args(argv)
    configure_logging()
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with _writer_lease(args):
            return _execute_all(args.stage_def, args)
    except DriftlabError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{parser.prog}: terminated by SIGTERM", file=sys.stderr)
        return 143


def _writer_lease(args: argparse.Namespace) -> contextlib.AbstractContextManager[object]:
    """A stage run by hand holds its run's lease (one writer per run); one a workflow
    started does not: the workflow's writer holds it, and its fan-out pods run in parallel."""
    if os.environ.get(ORCHESTRATED_ENV) or not is_primary_process():  # torchrun: rank 0
        return contextlib.nullcontext()
    stage: StageDef = args.stage_def
    run_id = layout.validate_run_id(args.run)
    return hold_lease(open_store(args.store), run_id, f"the {stage.name} stage run by hand")


def _execute_all(stage: StageDef, args: argparse.Namespace) -> int:
    if stage.fan_out is None or stage.shard(args) is not None:
        return execute(stage, args)
    store = open_store(args.store)
    spec = load_run_spec(store, layout.validate_run_id(args.run))
    shards = stage.fan_out(args, spec, store)
    if not shards:
        get_logger(stage.name, args.run).warning("nothing to do: no shard to run")
    for shard_args in shards:
        code = execute(stage, shard_args)
        if code:
            return code
    return 0


def _raise_terminated(_signum: int, _frame: object) -> None:
    raise Terminated()


def _configure(parser: argparse.ArgumentParser, stage: StageDef) -> None:
    parser.description = stage.help
    add_common_arguments(parser)
    if stage.add_arguments:
        stage.add_arguments(parser)
    parser.set_defaults(stage_def=stage)
