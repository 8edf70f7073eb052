"""The run registry: one row per run, built from what the stages wrote.

There is no database: a run's row is its `spec.yaml` (every spec field as a dotted
column), its `status/*` objects (each stage's state and headline numbers) and its
annotations. Reading only those small objects keeps `driftlab runs` fast on a store
holding thousands of runs, and means a run is listed the moment its spec is written.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import yaml

from shared import layout
from shared.errors import ArtifactNotFound, DriftlabError, StoreError
from shared.lease import read_lease
from shared.runs_table import FORMATS, cell, fit_columns, render
from shared.store import DEFAULT_STORE_URL, LocalStore, Store, open_store
from shared.yaml_budget import bounded_load

if TYPE_CHECKING:
    from shared.spec import RunSpec

Row = dict[str, Any]

# Shown by default, in this order, when present; plus custom.*, tags and headline numbers.
BASE_COLUMNS = (
    "run_id",
    "run.name",
    "created",
    "state",
    "model.arch",
    "data.dataset",
    "train.steps",
)
DEFAULT_PATTERNS = ("run.tags.*", "custom.*", "annotations.*", "*.headline.*")
_FILTER_RE = re.compile(r"^(?P<key>[^=!<>]+?)\s*(?P<op>!=|>=|<=|=|>|<)\s*(?P<value>.*)$")
_STAMP_RE = re.compile(r"-(\d{8}-\d{6})-[0-9a-f]{6}$")
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class RegistryError(DriftlabError):
    exit_code = 2


def load_rows(store: Store, workers: int | None = None) -> list[Row]:
    """Every run in the store as a row; unreadable runs still appear, with an error column."""
    run_ids = store.list_dirs(layout.RUNS_PREFIX)
    cache = _SpecCache(store) if isinstance(store, LocalStore) else None
    if workers is None:
        # Remote stores are latency-bound; a local one is parse-bound (threads add nothing).
        workers = 1 if isinstance(store, LocalStore) else 16
    if workers <= 1:
        rows = [_load_row(store, run_id, cache) for run_id in run_ids]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(lambda rid: _load_row(store, rid, cache), run_ids))
    if cache is not None:
        cache.save()
    return rows


class _SpecCache:
    """Flattened specs of a local store, keyed by each spec file's (mtime, size, inode).

    Parsing YAML costs about a millisecond per spec even with libyaml, which would make
    `driftlab runs` slow on a store with thousands of runs; a JSON cache beside the runs
    answers in tens of milliseconds and is as safe as git's index: any change to a spec
    file changes its stat signature. It is only a cache: losing it costs one re-parse.
    """

    def __init__(self, store: LocalStore) -> None:
        self.root = store.root
        self.path = store.root / ".driftlab-cache" / "registry-specs-v1.json"
        self.dirty = False
        try:
            loaded = json.loads(self.path.read_text())
            self.entries: dict[str, Any] = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self.entries = {}

    def flat_spec(self, run_id: str) -> dict[str, Any]:
        path = self.root / layout.spec_key(run_id)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ArtifactNotFound(f"{path} does not exist") from None
        signature = [st.st_mtime_ns, st.st_size, st.st_ino]
        hit = self.entries.get(run_id)
        if isinstance(hit, dict) and hit.get("sig") == signature:
            return dict(hit["flat"])
        flat = _parse_flat_spec(path.read_bytes())
        self.entries[run_id] = {"sig": signature, "flat": flat}
        self.dirty = True
        return flat

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries, separators=(",", ":")))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only store still lists, just without the speed-up


def _parse_flat_spec(data: bytes) -> dict[str, Any]:
    from shared.spec import flatten_spec  # pydantic models are only needed on a cache miss

    spec = bounded_load(data, _Loader)  # a stored spec.yaml is input too: under the budget
    if not isinstance(spec, dict):
        raise yaml.YAMLError("spec.yaml is not a mapping")
    return flatten_spec(spec)


def _load_row(store: Store, run_id: str, cache: _SpecCache | None = None) -> Row:
    row: Row = {"run_id": run_id}
    stamp = _STAMP_RE.search(run_id)
    if stamp:
        try:
            created = datetime.strptime(stamp.group(1), "%Y%m%d-%H%M%S")
            row["created"] = created.strftime("%Y-%m-%d %H:%M:%S")
        except ValueError:
            pass  # a hand-made id that only looks stamped
    try:
        if cache is not None:
            row.update(cache.flat_spec(run_id))
        else:
            row.update(_parse_flat_spec(store.get_bytes(layout.spec_key(run_id))))
    except ArtifactNotFound:
        row["error"] = "no spec.yaml"
    except yaml.YAMLError:
        row["error"] = "unreadable spec.yaml"
    states: dict[str, list[str]] = {}
    for key in store.list(layout.status_prefix(run_id)):
        if not key.endswith(".json"):
            continue
        name = key.rsplit("/", 1)[-1][: -len(".json")]
        try:
            status = store.get_json(key)
        except ArtifactNotFound:
            continue  # deleted while listing
        except StoreError:  # not JSON: one damaged object must not hide the store's runs
            status = None
        if not isinstance(status, dict):
            row["error"] = f"damaged status/{name}.json: delete it, or rerun the stage"
            continue
        if name == "annotations":
            for k, v in (status.get("values") or {}).items():
                row[f"annotations.{k}"] = v
            continue
        stage = str(status.get("stage") or name)
        states.setdefault(stage, []).append(str(status.get("state", "unknown")))
        for k, v in (status.get("headline") or {}).items():
            row[f"{name}.headline.{k}"] = v
        if status.get("error"):
            row[f"{name}.error"] = status["error"]
    for stage, shard_states in states.items():
        row[f"stage.{stage}"] = _summarise(shard_states)
    row["state"] = _overall_state(states)
    if row["state"] == "running":
        lease = read_lease(store, run_id)
        if lease is not None and lease.abandoned():
            # Its writer died mid-stage (a SIGKILL): the stage will never finish by itself.
            row["state"] = f"stale (last seen {lease.last_seen()})"
    return row


def _summarise(states: Sequence[str]) -> str:
    ok = sum(s in ("succeeded", "cached") for s in states)
    for bad in ("failed", "running"):
        if bad in states:
            return bad if len(states) == 1 else f"{bad} ({ok}/{len(states)} ok)"
    if ok == len(states):
        return "succeeded" if len(states) == 1 else f"succeeded ({ok})"
    return states[0]


def _overall_state(states: dict[str, list[str]]) -> str:
    flat = [s for shard_states in states.values() for s in shard_states]
    if not flat:
        return "new"
    if "failed" in flat:
        return "failed"
    if "running" in flat:
        return "running"
    return "done" if "evaluate" in states else "partial"


# -- querying --------------------------------------------------------------------------


def parse_filters(exprs: Iterable[str]) -> list[tuple[str, str, Any]]:
    filters = []
    for expr in exprs:
        m = _FILTER_RE.match(expr.strip())
        if not m:
            raise RegistryError(
                f"--filter {expr!r}: expected KEY=VALUE (or !=, >, <, >=, <=), "
                "e.g. --filter train.learning_rate=0.001"
            )
        filters.append((m["key"].strip(), m["op"], _coerce(m["value"].strip())))
    return filters


def _coerce(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none", "~"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _matches(row: Row, key: str, op: str, want: Any) -> bool:
    have = row.get(key)
    if op in ("=", "!="):
        if (
            isinstance(want, str)
            and isinstance(have, str | int | float)
            and any(c in want for c in "*?[")
        ):
            equal = fnmatch.fnmatchcase(str(have), want)
        elif isinstance(have, list):
            equal = want in have or str(want) == json.dumps(have)
        else:
            equal = have == want or (have is not None and str(have) == str(want))
        return equal if op == "=" else not equal
    if have is None:
        return False
    if _is_number(have) and _is_number(want):
        a, b = float(have), float(want)
    else:
        a, b = str(have), str(want)  # type: ignore[assignment]
    return {">": a > b, "<": a < b, ">=": a >= b, "<=": a <= b}[op]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def query(
    rows: Sequence[Row],
    filters: Sequence[tuple[str, str, Any]] = (),
    sort_by: Sequence[str] = ("created",),
    descending: bool = False,
    limit: int | None = None,
) -> list[Row]:
    """Filter (all ANDed), sort (missing values last, numbers before text), limit."""
    known = {k for row in rows for k in row}
    for key, _, _ in filters:
        _check_column(key, known)
    for key in sort_by:
        _check_column(key, known, allow_missing=key == "created")
    kept = [r for r in rows if all(_matches(r, *f) for f in filters)]
    # Stable sorts from the last key to the first give a lexicographic multi-key order.
    for key in reversed([*sort_by, "run_id"]):
        present = [r for r in kept if r.get(key) is not None]
        absent = [r for r in kept if r.get(key) is None]
        present.sort(key=partial(_row_sort_key, key), reverse=descending)
        kept = present + absent
    return kept[:limit] if limit is not None else kept


def _row_sort_key(key: str, row: Row) -> tuple[int, Any]:
    return _sort_key(row[key])


def _sort_key(v: Any) -> tuple[int, Any]:
    if _is_number(v) and not (isinstance(v, float) and math.isnan(v)):
        return (0, float(v))
    return (1, json.dumps(v) if isinstance(v, list | dict) else str(v))


def _check_column(key: str, known: set[str], allow_missing: bool = False) -> None:
    if key in known or allow_missing or not known:
        return
    import difflib

    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else " (see --list-columns)"
    raise RegistryError(f"unknown column {key!r}{hint}")


def select_columns(
    rows: Sequence[Row], show: Sequence[str] = (), hide: Sequence[str] = ()
) -> list[str]:
    """Default columns, plus `show` and minus `hide` (both accept glob patterns)."""
    known: list[str] = []
    seen: set[str] = set()
    for row in rows:
        for k in row:
            if k not in seen:
                seen.add(k)
                known.append(k)
    cols = [c for c in BASE_COLUMNS if c in seen]
    extra = sorted(k for k in seen if any(fnmatch.fnmatchcase(k, p) for p in DEFAULT_PATTERNS))
    # Per-shard headlines (24 SAE layers...) would drown the table: opt in with --show.
    extra = [k for k in extra if not re.match(r"^[a-z]+-[a-z0-9-]+\.headline\.", k)]
    for pattern in show:
        matched = [k for k in known if fnmatch.fnmatchcase(k, pattern)] or (
            [] if any(c in pattern for c in "*?[") else [pattern]
        )
        if not matched:
            _check_column(pattern, seen)
        extra += matched
    ordered = list(dict.fromkeys(cols + extra))
    return [c for c in ordered if not any(fnmatch.fnmatchcase(c, p) for p in hide)]


def all_columns(rows: Sequence[Row]) -> list[str]:
    return sorted({k for row in rows for k in row})


# -- output ----------------------------------------------------------------------------


def annotate(store: Store, run_id: str, values: dict[str, Any]) -> dict[str, Any]:
    """Merge user metrics into the run's annotations object (its only writer is the user)."""
    layout.validate_run_id(run_id)
    if not store.exists(layout.spec_key(run_id)):
        raise RegistryError(f"no run {run_id!r} in {store.url} (see `driftlab runs`)")
    key = layout.annotation_key(run_id)
    try:
        current = store.get_json(key).get("values", {})
    except ArtifactNotFound:
        current = {}
    current.update(values)
    store.put_json(key, {"stage": "annotations", "run_id": run_id, "values": current})
    return current


# -- command line ----------------------------------------------------------------------


def add_runs_parser(commands: Any) -> None:
    runs = commands.add_parser(
        "runs",
        help="list, filter and sort runs; annotate a run",
        description="One row per run, from each run's spec.yaml and status objects.",
    )
    add_store_argument(runs)
    runs.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep rows where the dotted column matches (=, !=, >, <, >=, <=; '*' globs); "
        "repeat to AND",
    )
    runs.add_argument("--sort-by", default="created", help="comma-separated columns")
    runs.add_argument("--descending", action="store_true")
    runs.add_argument("--show", action="append", default=[], help="add columns (globs ok)")
    runs.add_argument("--hide", action="append", default=[], help="drop columns (globs ok)")
    runs.add_argument("--limit", type=int, default=None)
    runs.add_argument("--list-columns", action="store_true", help="print every column name")
    runs.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="table: fitted to the terminal ($COLUMNS), values shortened; csv, json: whole",
    )
    runs.set_defaults(handler=_cmd_runs)
    sub = runs.add_subparsers(dest="runs_command", metavar="SUBCOMMAND")
    create = sub.add_parser("create", help="register a run from a spec; prints its run id")
    create.add_argument("spec", metavar="SPEC", help="run spec YAML file")
    create.add_argument("--run", metavar="RUN_ID", help="use this run id instead of a new one")
    add_store_argument(create)
    create.set_defaults(handler=_cmd_create)
    ann = sub.add_parser("annotate", help="add custom metrics to a run, shown as columns")
    ann.add_argument("run_id", metavar="RUN_ID")
    ann.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    add_store_argument(ann)
    ann.set_defaults(handler=_cmd_annotate)


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=os.environ.get("DRIFTLAB_STORE", DEFAULT_STORE_URL),
        help="store URL (default $DRIFTLAB_STORE or %(default)s)",
    )


def _split_list(values: Sequence[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _cmd_runs(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise RegistryError("--limit must be zero or more")
    rows = load_rows(open_store(args.store))
    if args.list_columns:
        sys.stdout.write("".join(f"{c}\n" for c in all_columns(rows)))
        return 0
    rows = query(
        rows,
        parse_filters(args.filter),
        _split_list([args.sort_by]),
        args.descending,
        args.limit,
    )
    if not rows and args.format == "table":
        where = f" match {' '.join(args.filter)}" if args.filter else f" in {args.store}"
        print(f"no runs{where}", file=sys.stderr)
        return 0
    shown = _split_list(args.show)
    columns = select_columns(rows, shown, _split_list(args.hide))
    width = _terminal_width() if args.format == "table" else None
    left_out = 0
    if width is not None:
        wanted = [c for c in columns if any(fnmatch.fnmatchcase(c, p) for p in shown)]
        fitted = fit_columns(rows, columns, width, wanted)
        left_out = len(columns) - len(fitted)
        columns = fitted
    sys.stdout.write(render(rows, columns, args.format, width))
    sys.stdout.flush()  # the note below the table, not above it, in a terminal
    if left_out:
        print(
            f"({left_out} more columns: --show COLUMN adds one, --list-columns lists them)",
            file=sys.stderr,
        )
    return 0


def _terminal_width() -> int | None:
    """The terminal's width ($COLUMNS first); None when writing to a pipe or file without
    $COLUMNS, where a table keeps every column (`| less -S` scrolls sideways)."""
    if os.environ.get("COLUMNS", "").strip().isdigit() or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def _cmd_create(args: argparse.Namespace) -> int:
    from shared.spec import load_spec

    print(create_run(open_store(args.store), load_spec(args.spec), args.run))
    return 0


def _cmd_annotate(args: argparse.Namespace) -> int:
    values: dict[str, Any] = {}
    for pair in args.pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise RegistryError(f"{pair!r}: expected KEY=VALUE with KEY like eval_ppl")
        values[key] = _coerce(value)
    merged = annotate(open_store(args.store), args.run_id, values)
    print(", ".join(f"{k}={cell(v)}" for k, v in sorted(merged.items())))
    return 0


# -- registering -------------------------------------------------------------------------


def create_run(store: Store, spec: RunSpec, run_id: str | None = None) -> str:
    """Register `spec` as a run by writing its resolved spec.yaml; returns the run id.

    The spec is what makes a run exist (it is listed from then on), and every stage reads
    it, so an existing run's spec is never replaced by a different one: its finished stages
    would then claim a spec they never ran. The same spec again is a no-op, so retrying a
    registration is safe. A new id comes from `run.name`; one that happens to be taken
    (two runs in the same second drawing the same 6 hex digits) is simply drawn again.
    The spec is written only if absent, atomically, so of two registrations of one id with
    different specs exactly one succeeds and the other is refused.
    """
    from shared.spec import flatten_spec, parse_spec, spec_to_yaml

    text = spec_to_yaml(spec)
    if run_id is None:
        run_id = layout.new_run_id(spec.run.name)
        while store.exists(layout.spec_key(run_id)):
            run_id = layout.new_run_id(spec.run.name)
    key = layout.spec_key(run_id)  # validates a given run id
    if store.put_bytes_if_absent(key, text.encode("utf-8")):  # of racing registrations, one
        return run_id
    existing = store.get_bytes(key)
    if existing == text.encode("utf-8"):
        return run_id
    try:
        stored = flatten_spec(parse_spec(existing.decode("utf-8", "replace"), store.url_of(key)))
    except DriftlabError:
        difference = "its spec.yaml is unreadable"
    else:
        wanted = flatten_spec(spec)
        if stored == wanted:
            return run_id
        path = next(k for k in [*wanted, *stored] if stored.get(k) != wanted.get(k))
        difference = (
            f"{path} is {json.dumps(stored.get(path))} there, {json.dumps(wanted.get(path))} here"
        )
    raise RegistryError(
        f"run {run_id} in {store.url} already has a different spec ({difference}); "
        "a run's spec never changes: leave out the run id to register a new run"
    )
