"""Sweeps: one run per point of a grid or random search, every run tagged with the sweep.

A sweep is not a new kind of object in the store: each point is an ordinary run whose spec
is the base spec with the point's values applied (`apply_overrides`, so every point is
validated like a spec file before anything is written), tagged `run.tags.sweep: <name>`
and `run.tags.sweep_index: "<i>"`. `driftlab runs --filter run.tags.sweep=NAME` is then
the sweep, and everything that reads runs (HMMs, comparisons) reads sweeps for free.

Sweep file format (YAML read like a spec: `1e-4` is a number, a duplicated key is an
error)::

    name: lr-seeds            # required: run.tags.sweep of every run (DNS-1123 label)
    method: grid              # grid (the default) | random
    parameters:               # dotted spec paths, checked like overrides; custom.* is free
      train.learning_rate: [1e-4, 3e-4, 1e-3]
      run.seed: [0, 1, 2]
      custom.width: [1, 2]

- ``grid``: every parameter is a list of values (or ``{values: [...]}``); one run per
  combination, in `itertools.product` order of the file's keys (the last key changes
  fastest), so ``sweep_index`` means the same point every time the file is expanded.
- ``random``: ``num_runs`` (required) points drawn with ``seed`` (default 0). A parameter
  is a list or ``{values: [...]}`` (one of them, uniformly), or
  ``{distribution: uniform | log_uniform | int_uniform, min: A, max: B}``; ``int_uniform``
  includes both ends, ``log_uniform`` needs ``min > 0``. Each parameter draws from its own
  stream, seeded by (``seed``, path): raising ``num_runs`` keeps the first points, and
  adding a parameter does not move the values of the others.

A fixed value belongs in the base spec; ``run.tags.sweep`` and ``run.tags.sweep_index`` are
set by the sweep and cannot be parameters. ``run.name`` stays the base spec's (run ids are
unique anyway, and the sweep is a column); sweep ``run.name`` to change it. A sweep of more
than ``--max-runs`` (default 1000) runs is refused: a typo in a grid should not register
thousands of runs. Configs in ``configs/sweeps/`` are examples.

`shared.spec` is imported inside the functions that need it: `driftlab` builds every
subcommand's parser on each call, and pydantic would add a fifth of a second to
`driftlab runs`.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import itertools
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from shared.errors import SpecError

if TYPE_CHECKING:
    from shared.spec import RunSpec

Method = Literal["grid", "random"]
DistributionKind = Literal["uniform", "log_uniform", "int_uniform"]

DEFAULT_MAX_RUNS = 1000
METHODS: tuple[str, ...] = get_args(Method)
DISTRIBUTIONS: tuple[str, ...] = get_args(DistributionKind)
#: Tags every run of a sweep gets; parameters may not set them.
RESERVED_PATHS = ("run.tags.sweep", "run.tags.sweep_index")

_TOP_KEYS = ("name", "method", "parameters", "num_runs", "seed")
_PARAMETER_KEYS = ("values", "distribution", "min", "max")
# Kept to a Kubernetes label value, so a sweep's workflows and pods can be labelled with it.
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_MAX_NAME = 63


@dataclass(frozen=True)
class Choice:
    """Listed values: each one in a grid, one of them (uniformly) per random point."""

    values: tuple[Any, ...]

    def sample(self, rng: random.Random) -> Any:
        return self.values[rng.randrange(len(self.values))]


@dataclass(frozen=True)
class Distribution:
    """A range to draw from (random sweeps only); `int_uniform` includes `high`."""

    kind: DistributionKind
    low: float
    high: float

    def sample(self, rng: random.Random) -> float | int:
        if self.kind == "int_uniform":
            return rng.randint(int(self.low), int(self.high))
        if self.kind == "log_uniform":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
            return min(max(value, self.low), self.high)  # exp(log(x)) may round past x
        return rng.uniform(self.low, self.high)


Parameter = Choice | Distribution


@dataclass(frozen=True)
class SweepDef:
    """A validated sweep file; `source` (its path) starts every error message about it."""

    name: str
    method: Method
    parameters: Mapping[str, Parameter]
    num_runs: int | None = None
    seed: int = 0
    source: str = "<sweep>"

    @property
    def size(self) -> int:
        """How many runs the sweep expands to."""
        if self.method == "random":
            return self.num_runs or 0
        return math.prod(len(p.values) for p in self.parameters.values() if isinstance(p, Choice))

    def describe_size(self) -> str:
        """`3 x 2 = 6 runs` for a grid, `8 random runs` otherwise: for summaries and errors."""
        if self.method == "random":
            return f"{self.size} random runs"
        factors = [len(p.values) for p in self.parameters.values() if isinstance(p, Choice)]
        if len(factors) == 1:
            return f"grid of {self.size} runs"
        return f"grid {' x '.join(map(str, factors))} = {self.size} runs"


# -- reading -----------------------------------------------------------------------------


def load_sweep(path: str | os.PathLike[str]) -> SweepDef:
    """Read and validate the sweep file at `path`; any problem is one `SpecError` line."""
    from shared.spec import read_yaml_file  # the spec files' YAML dialect, so both read alike

    data, source = read_yaml_file(
        path, what="sweep", examples="configs/sweeps/", starter="configs/sweeps/lr-seeds.yaml"
    )
    return sweep_from_dict(data, source)


def sweep_from_dict(data: Any, source: str = "<sweep>") -> SweepDef:
    """Validate parsed sweep data; errors read `<source>: <key>: <problem>`."""
    # shared.spec's own path check, so a sweep's unknown path gets the same suggestion
    # (`train.lr` -> `train.learning_rate`) as an override or a spec file would.
    from shared.spec import _check_override_path, _show

    if not isinstance(data, Mapping):
        raise SpecError(
            f"{source}: the top level must be a mapping with name, method and parameters; "
            f"got {_show(data)}"
        )
    for key in data:
        if key not in _TOP_KEYS:
            raise SpecError(f"{source}: {key}: {_unknown(str(key), _TOP_KEYS)}")

    name = data.get("name")
    if name is None:
        raise SpecError(f"{source}: name: is required; it becomes run.tags.sweep of every run")
    if not isinstance(name, str) or len(name) > _MAX_NAME or not _NAME_RE.match(name):
        raise SpecError(
            f"{source}: name: must be lower-case letters, digits and '-', start and end with a "
            f"letter or digit, and have at most {_MAX_NAME} characters (it becomes a "
            f"Kubernetes label); got {_show(name)}"
        )

    method = data.get("method", "grid")
    if method not in METHODS:
        raise SpecError(f"{source}: method: {_not_one_of(method, METHODS)}")

    num_runs: int | None = None
    seed = 0
    if method == "grid":
        for key in ("num_runs", "seed"):
            if key in data:
                raise SpecError(
                    f"{source}: {key}: only applies to method: random (a grid runs every "
                    "combination; to repeat runs, add run.seed to the parameters)"
                )
    else:
        num_runs = data.get("num_runs")
        if num_runs is None:
            raise SpecError(f"{source}: num_runs: is required with method: random")
        if not _is_int(num_runs) or num_runs < 1:
            raise SpecError(
                f"{source}: num_runs: must be a positive integer, got {_show(num_runs)}"
            )
        seed = data.get("seed", 0)
        if not _is_int(seed) or seed < 0:
            raise SpecError(f"{source}: seed: must be a non-negative integer, got {_show(seed)}")

    raw_parameters = data.get("parameters")
    if not isinstance(raw_parameters, Mapping) or not raw_parameters:
        raise SpecError(
            f"{source}: parameters: is required: a mapping of dotted spec paths to values, "
            "e.g. train.learning_rate: [1e-4, 1e-3]"
        )
    parameters: dict[str, Parameter] = {}
    for path, raw in raw_parameters.items():
        if not isinstance(path, str):
            raise SpecError(
                f"{source}: parameters: keys must be dotted spec paths, got {_show(path)}"
            )
        where = f"{source}: parameters: {path}"
        if path in RESERVED_PATHS:
            raise SpecError(f"{where}: is set by the sweep itself; remove it")
        _check_override_path(path.split("."), path, f"{source}: parameters")
        for other in parameters:
            if path.startswith(other + ".") or other.startswith(path + "."):
                raise SpecError(f"{where}: overlaps {other}; sweep one or the other")
        parameters[path] = _parse_parameter(raw, method, where)
    return SweepDef(
        name=name,
        method=method,
        parameters=parameters,
        num_runs=num_runs,
        seed=seed,
        source=source,
    )


def _parse_parameter(raw: Any, method: str, where: str) -> Parameter:
    from shared.spec import _show

    if isinstance(raw, list):
        return _choice(raw, where)
    if not isinstance(raw, Mapping):
        forms = "a list of values" + (" or {distribution, min, max}" if method == "random" else "")
        raise SpecError(
            f"{where}: expected {forms}, got {_show(raw)} (a fixed value belongs in the base "
            "spec; a single point is a one-element list)"
        )
    for key in raw:
        if key not in _PARAMETER_KEYS:
            raise SpecError(f"{where}: {key}: {_unknown(str(key), _PARAMETER_KEYS)}")
    if "values" in raw:
        if len(raw) > 1:
            raise SpecError(f"{where}: give either values or distribution with min and max")
        if not isinstance(raw["values"], list):
            raise SpecError(f"{where}: values: expected a list, got {_show(raw['values'])}")
        return _choice(raw["values"], where)
    if "distribution" not in raw:
        raise SpecError(f"{where}: needs values: [...] or distribution with min and max")
    if method == "grid":
        raise SpecError(f"{where}: a distribution needs method: random; a grid takes a list")
    kind = raw["distribution"]
    if kind not in DISTRIBUTIONS:
        raise SpecError(f"{where}: distribution: {_not_one_of(kind, DISTRIBUTIONS)}")
    bounds: list[float] = []
    for key in ("min", "max"):
        value = raw.get(key)
        if value is None:
            raise SpecError(f"{where}: {key}: is required with distribution: {kind}")
        if kind == "int_uniform" and not _is_int(value):
            raise SpecError(f"{where}: {key}: expected an integer, got {_show(value)}")
        if not _is_number(value) or not math.isfinite(value):
            raise SpecError(f"{where}: {key}: expected a finite number, got {_show(value)}")
        bounds.append(value)
    low, high = bounds
    if low >= high:
        raise SpecError(f"{where}: min ({low}) must be less than max ({high})")
    if kind == "log_uniform" and low <= 0:
        raise SpecError(f"{where}: min: must be > 0 for log_uniform, got {low}")
    return Distribution(kind, low, high)


def _choice(values: list[Any], where: str) -> Choice:
    if not values:
        raise SpecError(f"{where}: has no values; list at least one")
    seen: set[str] = set()
    for value in values:
        canonical = json.dumps(value, sort_keys=True, default=str)
        if canonical in seen:
            raise SpecError(
                f"{where}: lists {canonical} twice; to repeat runs, add run.seed to the parameters"
            )
        seen.add(canonical)
    return Choice(tuple(values))


def _unknown(key: str, valid: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(valid)}"
    return f"unknown key ({hint})"


def _not_one_of(value: Any, options: tuple[str, ...]) -> str:
    from shared.spec import _show

    close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"must be one of {', '.join(options)}; got {_show(value)}{hint}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- expanding ---------------------------------------------------------------------------


def points(sweep: SweepDef, max_runs: int = DEFAULT_MAX_RUNS) -> list[dict[str, Any]]:
    """The overrides of each run, in `sweep_index` order; the same for the same file."""
    if sweep.size > max_runs:
        raise SpecError(
            f"{sweep.source}: {sweep.describe_size()} is more than --max-runs {max_runs}; "
            "shrink the sweep or raise --max-runs"
        )
    paths = list(sweep.parameters)
    if sweep.method == "grid":
        lists = [p.values for p in sweep.parameters.values() if isinstance(p, Choice)]
        return [dict(zip(paths, combo, strict=True)) for combo in itertools.product(*lists)]
    draws: dict[str, list[Any]] = {}
    for path, parameter in sweep.parameters.items():
        rng = _stream(sweep.seed, path)
        draws[path] = [parameter.sample(rng) for _ in range(sweep.size)]
    return [{path: draws[path][i] for path in paths} for i in range(sweep.size)]


def _stream(seed: int, path: str) -> random.Random:
    """A generator of its own per parameter, seeded from text so it is the same everywhere."""
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def expand(base: RunSpec, sweep: SweepDef, max_runs: int = DEFAULT_MAX_RUNS) -> list[RunSpec]:
    """One validated spec per point, tagged with the sweep; an invalid point is an error.

    Every point is checked before the caller writes anything, so a bad combination
    (say, a width the head count does not divide) never leaves half a sweep registered.
    """
    from shared.spec import apply_overrides

    specs = []
    for i, point in enumerate(points(sweep, max_runs)):
        overrides = {**point, "run.tags.sweep": sweep.name, "run.tags.sweep_index": str(i)}
        where = f"{sweep.source}: run {i} ({_describe_point(point)})"
        specs.append(apply_overrides(base, overrides, where))
    return specs


def _describe_point(point: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{path}={value if isinstance(value, str) else json.dumps(value, default=str)}"
        for path, value in point.items()
    )


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
    from shared.registry import render

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
    from shared.registry import _add_store_argument  # one --store, like `driftlab runs`

    sweep = commands.add_parser(
        "sweep",
        help="register one run per point of a grid or random sweep",
        description="Expand SWEEP.yaml over BASE.yaml into one run per point, each tagged "
        "run.tags.sweep=NAME; prints the run ids, one per line.",
    )
    sweep.add_argument("base", metavar="BASE.yaml", help="run spec every point starts from")
    sweep.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file (see configs/sweeps/)")
    _add_store_argument(sweep)
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
    from shared.registry import RegistryError, create_run, load_rows, render
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
