"""Progress of a stage, shown everywhere someone might look, from one object.

    with progress("train", run_id=run_id, total=steps, unit="step") as p:
        for step in range(steps):
            ...
            p.update()
            p.set("driftlab_train_loss", loss)
            p.set("driftlab_sae_l0", l0, layer=3)     # labels as keyword arguments

One `progress(...)` at once

- draws a tqdm bar when stderr is a terminal, else logs a line every 10 % or 30 s (pod
  logs stay readable);
- writes `N/M` to `$ARGO_PROGRESS_FILE` (the Argo UI's progress), atomically, at most once
  a second, skipped when the total is unknown or 0 because Argo only accepts integers
  `0 <= N <= M`, `M > 0` (N is capped at M for the same reason);
- keeps every metric in a private `CollectorRegistry` and PUTs it to the Pushgateway at
  `$DRIFTLAB_PUSHGATEWAY` (`host:port` or a URL) at most every 2 s, under the grouping key
  {job="driftlab", run_id, stage[, shard]}, with a final push on close that records the
  duration, the end time and success or failure (every push carries the start time: the
  dashboard's start and end annotations).

Decisions:

- An unsharded stage has no `shard` in its grouping key (rather than `shard="all"`):
  to Prometheus a missing label and an empty one are the same series selector, so
  dashboards need no special value that could clash with a real shard name.
- PUT replaces the whole group, so one group holds exactly what the latest attempt of that
  stage reported; a second `progress` for the same (run, stage, shard) replaces the first's
  metrics. `push_metrics` adds headline numbers with POST, which keeps the rest.
- Telemetry never breaks a stage: a failed push (unreachable, timeout, 4xx/5xx) logs one
  warning per gateway per process, backs off up to 60 s, and the loop goes on. The push is
  synchronous (≈ms on a cluster network) with a 2 s timeout, so no thread is needed.
- Work happens only when something is due: `update()` costs an addition and a clock read,
  so it can be called for every batch. Pushes ride on `update`/`set`/`inc`/`observe`
  calls; a stage silent for minutes shows a stale `push_time_seconds` until its next call.

Not thread-safe: use a `Progress` from the thread that created it.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from urllib.error import HTTPError

from prometheus_client import CollectorRegistry, push_to_gateway, pushadd_to_gateway
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from tqdm import tqdm

from shared.layout import validate_run_id
from shared.log import StageLogger, get_logger
from shared.metrics import METRICS, Kind, metric

GATEWAY_ENV = "DRIFTLAB_PUSHGATEWAY"
PROGRESS_FILE_ENV = "ARGO_PROGRESS_FILE"
JOB = "driftlab"
PUSH_INTERVAL_S = 2.0
PUSH_TIMEOUT_S = 2.0
MAX_PUSH_BACKOFF_S = 60.0
PROGRESS_FILE_INTERVAL_S = 1.0
LOG_INTERVAL_S = 30.0
LOG_FRACTION = 0.1

_RATIO = metric("driftlab_stage_progress_ratio").name
_DONE = metric("driftlab_stage_items_done_total").name
_EXPECTED = metric("driftlab_stage_items_expected").name
_DURATION = metric("driftlab_stage_duration_seconds").name
_STARTED = metric("driftlab_stage_start_timestamp_seconds").name
_ENDED = metric("driftlab_stage_end_timestamp_seconds").name
_LAST_SUCCESS = metric("driftlab_stage_last_success_timestamp_seconds").name
_FAILED = metric("driftlab_stage_failed").name
_RUNNING = metric("driftlab_stage_running").name

_USE = {
    "gauge": "set() or inc()",
    "counter": "inc(), or set() for an absolute total",
    "histogram": "observe()",
}
# Things already warned about in this process (gateway addresses, progress files).
_warned: set[str] = set()

Labels = Mapping[str, str | int]


def _warn_once(log: StageLogger, key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s (shown once)", message)


def _series(name: str, labels: Labels, kinds: tuple[Kind, ...]) -> tuple[str, ...]:
    """Check `name` is declared with this kind and exactly these labels; its label values."""
    d = metric(name)
    if d.kind not in kinds:
        raise ValueError(f"metric {name!r} is a {d.kind}: use {_USE[d.kind]}")
    if len(labels) != len(d.labels) or not all(label in labels for label in d.labels):
        raise ValueError(f"metric {name!r} takes labels {list(d.labels)}, got {sorted(labels)}")
    return tuple(str(labels[label]) for label in d.labels)


class _Histogram:
    """Per-bucket (not cumulative) counts; the last slot is the +Inf bucket."""

    __slots__ = ("counts", "sum_value")

    def __init__(self, n_buckets: int) -> None:
        self.counts = [0] * (n_buckets + 1)
        self.sum_value = 0.0


class _Values(Collector):
    """The latest value of every series set so far, exposed to a private registry.

    Plain dicts instead of prometheus_client's Gauge/Counter objects: counters can then
    carry absolute totals (a resumed trainer's token count), no `_created` series are
    emitted, and setting a value is a dict store.
    """

    def __init__(self) -> None:
        self._scalars: dict[str, dict[tuple[str, ...], float]] = {}
        self._histograms: dict[str, dict[tuple[str, ...], _Histogram]] = {}

    def set(self, name: str, value: float, labels: Labels) -> None:
        key = _series(name, labels, ("gauge", "counter"))
        self._scalars.setdefault(name, {})[key] = float(value)

    def inc(self, name: str, amount: float, labels: Labels) -> None:
        key = _series(name, labels, ("gauge", "counter"))
        if amount < 0 and metric(name).kind == "counter":
            raise ValueError(f"counter {name!r} only goes up; got inc({amount})")
        series = self._scalars.setdefault(name, {})
        series[key] = series.get(key, 0.0) + float(amount)

    def observe(self, name: str, value: float, labels: Labels) -> None:
        key = _series(name, labels, ("histogram",))
        buckets = metric(name).buckets
        hist = self._histograms.setdefault(name, {}).get(key)
        if hist is None:
            hist = self._histograms[name][key] = _Histogram(len(buckets))
        hist.counts[bisect.bisect_left(buckets, value)] += 1
        hist.sum_value += float(value)

    def collect(self) -> Iterator[Metric]:
        family: GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily
        for d in METRICS:
            if d.kind == "histogram":
                histograms = self._histograms.get(d.name)
                if not histograms:
                    continue
                family = HistogramMetricFamily(d.name, d.help, labels=d.labels)
                bounds = [floatToGoString(b) for b in d.buckets] + ["+Inf"]
                for key, hist in histograms.items():
                    cumulative = [float(c) for c in itertools.accumulate(hist.counts)]
                    family.add_metric(
                        list(key), list(zip(bounds, cumulative, strict=True)), hist.sum_value
                    )
                yield family
                continue
            scalars = self._scalars.get(d.name)
            if not scalars:
                continue
            cls = CounterMetricFamily if d.kind == "counter" else GaugeMetricFamily
            family = cls(d.name, d.help, labels=d.labels)
            for key, value in scalars.items():
                family.add_metric(list(key), value)
            yield family


def _grouping_key(stage: str, run_id: str, shard: str | None) -> dict[str, str]:
    """{run_id, stage[, shard]}; Pushgateway grouping values may not be empty."""
    if not stage:
        raise ValueError("stage name is empty")
    if shard == "":
        raise ValueError("shard is empty: pass None for an unsharded stage")
    key = {"run_id": validate_run_id(run_id), "stage": stage}
    if shard is not None:
        key["shard"] = shard
    return key


def _gateway() -> str | None:
    return os.environ.get(GATEWAY_ENV, "").strip() or None


def _describe(err: Exception) -> str:
    """The error, with the Pushgateway's reason for a 4xx (e.g. an inconsistent metric)."""
    if isinstance(err, HTTPError):
        body = err.read(300).decode("utf-8", "replace").strip()
        return f"{err}: {body}" if body else str(err)
    return str(err) or type(err).__name__


class Progress:
    """A stage's progress and metrics; see the module docstring. Made by `progress()`."""

    def __init__(
        self,
        stage: str,
        *,
        run_id: str,
        total: int | None,
        shard: str | None,
        unit: str,
        desc: str | None,
        initial: int,
    ) -> None:
        if total is not None and total < 0:
            raise ValueError(f"progress total must be >= 0 or None, got {total}")
        self._group = _grouping_key(stage, run_id, shard)
        self._total = total
        self._n = initial
        self._initial = initial
        self._unit = unit
        # Log lines already name the stage; `desc` only adds what the loop is about.
        self._prefix = f"{desc}: " if desc and desc != stage else ""
        self._log = get_logger(stage, run_id, shard)
        self._values = _Values()
        self._registry = CollectorRegistry()
        self._registry.register(self._values)
        self._gateway = _gateway()
        file = os.environ.get(PROGRESS_FILE_ENV, "").strip()
        self._progress_file = Path(file) if file and total else None
        self._file_text: str | None = None
        self._push_interval = PUSH_INTERVAL_S
        self._closed = False
        self._start = time.monotonic()
        self._started_at = time.time()
        self._bar = (
            tqdm(total=total, initial=initial, desc=desc or stage, unit=unit, dynamic_ncols=True)
            if sys.stderr.isatty()
            else None
        )
        # Each output's next due time (inf: never); `_next_due` is the earliest.
        self._next_log_n = math.inf
        self._next_log_at = -math.inf if self._bar is None else math.inf
        self._next_file_at = -math.inf if self._progress_file else math.inf
        self._next_push_at = -math.inf if self._gateway else math.inf
        self._next_due = -math.inf
        self._tick()

    @property
    def total(self) -> int | None:
        """Items expected, or None when unknown."""
        return self._total

    @property
    def n(self) -> int:
        """Items done so far, `initial` included."""
        return self._n

    def update(self, n: int = 1) -> None:
        """Advance by `n` items; logs, writes and pushes only when one of them is due."""
        self._n += n
        if self._bar is not None:
            self._bar.update(n)
        if self._n >= self._next_log_n or time.monotonic() >= self._next_due:
            self._tick()

    def set(self, name: str, value: float, /, **labels: str | int) -> None:
        """Set a declared gauge (or a counter's absolute total) to `value`."""
        self._values.set(name, value, labels)
        if time.monotonic() >= self._next_due:
            self._tick()

    def inc(self, name: str, amount: float = 1.0, /, **labels: str | int) -> None:
        """Add `amount` to a declared counter or gauge."""
        self._values.inc(name, amount, labels)
        if time.monotonic() >= self._next_due:
            self._tick()

    def observe(self, name: str, value: float, /, **labels: str | int) -> None:
        """Record one observation of a declared histogram."""
        self._values.observe(name, value, labels)
        if time.monotonic() >= self._next_due:
            self._tick()

    def close(self, failed: bool = False) -> None:
        """Final log line, progress file and push (always attempted); later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        self._next_due = self._next_log_n = math.inf
        now = time.monotonic()
        if self._bar is not None:
            self._bar.close()
        else:
            self._log_final(now, failed)
        if self._progress_file is not None:
            self._write_progress_file()
        if self._gateway is not None:
            self._push(now, final=True, failed=failed)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=exc_type is not None)

    # -- outputs -------------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        if self._n >= self._next_log_n or now >= self._next_log_at:
            self._log_progress(now)
        if now >= self._next_file_at:
            self._write_progress_file()
            self._next_file_at = now + PROGRESS_FILE_INTERVAL_S
        if now >= self._next_push_at:
            self._push(now, final=False, failed=False)
        self._next_due = min(self._next_log_at, self._next_file_at, self._next_push_at)

    def _rate(self, now: float) -> float:
        elapsed = now - self._start
        return (self._n - self._initial) / elapsed if elapsed > 0 else 0.0

    def _log_progress(self, now: float) -> None:
        rate = self._rate(now)
        text = f"{self._prefix}{self._n}"
        if self.total:
            text += f"/{self.total} {self._unit} ({100 * min(self._n / self.total, 1):.0f}%)"
            if rate > 0 and self._n < self.total:
                eta = timedelta(seconds=round((self.total - self._n) / rate))
                text += f", {rate:.3g} {self._unit}/s, eta {eta}"
            step = max(1, math.ceil(self.total * LOG_FRACTION))
            boundary = (self._n // step + 1) * step
            # The 100 % line is close()'s.
            self._next_log_n = boundary if boundary < self.total else math.inf
        else:
            text += f" {self._unit}" + (f", {rate:.3g} {self._unit}/s" if rate > 0 else "")
        self._log.info("%s", text)
        self._next_log_at = now + LOG_INTERVAL_S

    def _log_final(self, now: float, failed: bool) -> None:
        done = f"{self._n}/{self.total}" if self.total is not None else str(self._n)
        elapsed = now - self._start
        if failed:
            self._log.warning(
                "%sfailed at %s %s after %.1fs", self._prefix, done, self._unit, elapsed
            )
        else:
            self._log.info(
                "%sdone, %s %s in %.1fs (%.3g %s/s)",
                self._prefix,
                done,
                self._unit,
                elapsed,
                self._rate(now),
                self._unit,
            )

    def _write_progress_file(self) -> None:
        """`N/M` via a temp file and rename, so Argo never reads a half-written file."""
        path, total = self._progress_file, self.total
        assert path is not None and total  # only scheduled when both are set
        text = f"{min(self._n, total)}/{total}"
        if text == self._file_text:
            return
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            # Argo's wait container reads it, possibly as another user.
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
            self._file_text = text
        except OSError as err:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            _warn_once(self._log, f"file:{path}", f"cannot write progress file {path}: {err}")

    def _sync_stage_metrics(self, now: float, final: bool, failed: bool) -> None:
        values = self._values
        values.set(_DONE, self._n, {})
        if self.total is not None:
            values.set(_EXPECTED, self.total, {})
            values.set(_RATIO, min(self._n / self.total, 1.0) if self.total else 1.0, {})
        values.set(_DURATION, now - self._start, {})
        values.set(_STARTED, self._started_at, {})
        if final:
            values.set(_ENDED, time.time(), {})
        values.set(_RUNNING, 0 if final else 1, {})
        values.set(_FAILED, 1 if failed else 0, {})
        if final and not failed:
            values.set(_LAST_SUCCESS, time.time(), {})

    def _push(self, now: float, final: bool, failed: bool) -> None:
        assert self._gateway is not None  # only scheduled with a gateway
        self._sync_stage_metrics(now, final, failed)
        try:
            push_to_gateway(
                self._gateway,
                job=JOB,
                registry=self._registry,
                grouping_key=self._group,
                timeout=PUSH_TIMEOUT_S,
            )
            self._push_interval = PUSH_INTERVAL_S
        except Exception as err:
            self._push_interval = min(self._push_interval * 2, MAX_PUSH_BACKOFF_S)
            _warn_once(
                self._log,
                self._gateway,
                f"cannot push metrics to the Pushgateway at {self._gateway} "
                f"({_describe(err)}); the stage goes on without them",
            )
        self._next_push_at = time.monotonic() + self._push_interval


def progress(
    stage: str,
    *,
    run_id: str,
    total: int | None = None,
    shard: str | None = None,
    unit: str = "it",
    desc: str | None = None,
    initial: int = 0,
) -> Progress:
    """Track a stage's progress and metrics; use as a context manager (or call `close`).

    `total=None` means unknown: no ratio, no progress file. `initial` starts the count
    (a resumed trainer). Raises ValueError (bad stage/shard) or LayoutError (bad run id).
    """
    return Progress(
        stage,
        run_id=run_id,
        total=total,
        shard=shard,
        unit=unit,
        desc=desc,
        initial=initial,
    )


def push_metrics(
    stage: str,
    run_id: str,
    values: Mapping[str, float],
    *,
    shard: str | None = None,
    labels: Labels | None = None,
) -> bool:
    """Push a stage's headline numbers once; True if the Pushgateway took them.

    POST (not PUT): replaces only these metrics in the group, so a finished progress's
    duration and outcome stay. `labels` apply to every metric (e.g. `layer=3`). Names are
    checked even when no Pushgateway is configured, so a typo fails in local runs too.
    """
    group = _grouping_key(stage, run_id, shard)
    collected = _Values()
    for name, value in values.items():
        collected.set(name, value, labels or {})
    gateway = _gateway()
    if gateway is None:
        return False
    registry = CollectorRegistry()
    registry.register(collected)
    try:
        pushadd_to_gateway(
            gateway, job=JOB, registry=registry, grouping_key=group, timeout=PUSH_TIMEOUT_S
        )
    except Exception as err:
        _warn_once(
            get_logger(stage, run_id, shard),
            gateway,
            f"cannot push metrics to the Pushgateway at {gateway} ({_describe(err)})",
        )
        return False
    return True
