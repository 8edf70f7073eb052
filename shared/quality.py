"""Quality verdicts: every stage judges its own output.

A number computed correctly can still mean nothing: a model below chance, an SAE worse than
predicting zero, a detector tested on six examples of a class. Each stage therefore ends
with a list of checks, `{stage, check, value, threshold, verdict, message}`, written into
its status object; the evaluator gathers every stage's list into `evaluate/report.json`
(`quality`), the report opens with a banner of the fails and warns, `driftlab run` prints
them after its stage table, and each verdict is a Prometheus gauge (0 ok, 1 warn, 2 fail).

The message of a warn or fail says what to change, so a researcher who reads only the
banner knows the next step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

from shared import layout
from shared.errors import DriftlabError
from shared.store import Store

Verdict = Literal["ok", "warn", "fail"]
VERDICTS: tuple[Verdict, ...] = ("ok", "warn", "fail")
#: The value of the `driftlab_quality_verdict` gauge: 0 ok, 1 warn, 2 fail.
SEVERITY: Mapping[Verdict, int] = {"ok": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True)
class QualityCheck:
    """One judged number of one stage (and shard)."""

    stage: str
    check: str
    value: float | None
    threshold: float | None
    verdict: Verdict
    message: str
    shard: str | None = None

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        for key in ("value", "threshold"):
            number = body[key]
            body[key] = None if number is None or not math.isfinite(number) else number
        return body

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QualityCheck:
        verdict = data.get("verdict")
        if verdict not in VERDICTS:
            raise ValueError(f"quality verdict must be one of {VERDICTS}, got {verdict!r}")
        return cls(
            stage=str(data["stage"]),
            check=str(data["check"]),
            value=_number(data.get("value")),
            threshold=_number(data.get("threshold")),
            verdict=cast(Verdict, verdict),
            message=str(data.get("message", "")),
            shard=None if data.get("shard") is None else str(data["shard"]),
        )

    @property
    def severity(self) -> int:
        return SEVERITY[self.verdict]

    def line(self) -> str:
        """`FAIL sae[layer-01] explained_variance: ...` for terminals and logs."""
        where = f"{self.stage}[{self.shard}]" if self.shard else self.stage
        return f"{self.verdict.upper():<4} {where} {self.check}: {self.message}"


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _fmt(value: float) -> str:
    """Counts as counts (1000, not 1e+03); everything else to three significant digits."""
    if float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.3g}"


def at_least(
    stage: str,
    check: str,
    value: float,
    *,
    what: str,
    fix: str,
    fail: float | None = None,
    warn: float | None = None,
) -> QualityCheck:
    """A check where higher is better: below `fail` fails, below `warn` warns.

    `what` names the quantity in the message ("explained variance"); `fix` is the change
    that would raise it, shown with a warn or fail. NaN fails (nothing was measured).
    """
    return _bounded(stage, check, value, what, fix, fail, warn, higher_is_better=True)


def at_most(
    stage: str,
    check: str,
    value: float,
    *,
    what: str,
    fix: str,
    fail: float | None = None,
    warn: float | None = None,
) -> QualityCheck:
    """A check where lower is better: at or above `fail` fails, at or above `warn` warns."""
    return _bounded(stage, check, value, what, fix, fail, warn, higher_is_better=False)


def _bounded(
    stage: str,
    check: str,
    value: float,
    what: str,
    fix: str,
    fail: float | None,
    warn: float | None,
    *,
    higher_is_better: bool,
) -> QualityCheck:
    if fail is None and warn is None:
        raise ValueError(f"quality check {check!r} needs a fail or a warn threshold")
    strictest = warn if warn is not None else fail
    assert strictest is not None
    if math.isnan(value):
        message = f"{what} is NaN: nothing usable was measured; {fix}"
        return QualityCheck(stage, check, None, strictest, "fail", message)
    bad_word, good_word = ("below", ">=") if higher_is_better else ("at or above", "<")
    limits: tuple[tuple[Verdict, float | None], ...] = (("fail", fail), ("warn", warn))
    for verdict, limit in limits:
        if limit is not None and (value < limit if higher_is_better else value >= limit):
            message = f"{what} {_fmt(value)} is {bad_word} {_fmt(limit)}; {fix}"
            return QualityCheck(stage, check, value, limit, verdict, message)
    message = f"{what} {_fmt(value)} {good_word} {_fmt(strictest)}"
    return QualityCheck(stage, check, value, strictest, "ok", message)


def judged(
    stage: str,
    check: str,
    value: float | None,
    threshold: float | None,
    verdict: Verdict,
    message: str,
) -> QualityCheck:
    """A check whose verdict the caller decided (a condition, not a single threshold)."""
    return QualityCheck(stage, check, value, threshold, verdict, message)


def with_shard(checks: Iterable[QualityCheck], shard: str | None) -> list[QualityCheck]:
    """The same checks, labelled with the shard (layer, checkpoint) that produced them."""
    return [QualityCheck(**{**asdict(c), "shard": shard}) for c in checks]


def worst_first(checks: Iterable[QualityCheck]) -> list[QualityCheck]:
    """Fails, then warns, then oks; stable within each verdict."""
    return sorted(checks, key=lambda c: -c.severity)


def problems(checks: Iterable[QualityCheck]) -> list[QualityCheck]:
    """Only the fails and warns, worst first: what a banner shows."""
    return [c for c in worst_first(checks) if c.verdict != "ok"]


def from_status(status: Mapping[str, Any]) -> list[QualityCheck]:
    """The checks a status object carries; a malformed entry is skipped, not fatal."""
    checks = []
    for entry in status.get("quality") or ():
        if not isinstance(entry, Mapping):
            continue
        try:
            checks.append(QualityCheck.from_json(entry))
        except (KeyError, TypeError, ValueError):
            continue
    return checks


def summary(checks: Sequence[QualityCheck]) -> dict[str, int]:
    """How many checks got each verdict."""
    return {v: sum(c.verdict == v for c in checks) for v in VERDICTS}


def run_checks(store: Store, run_id: str, exclude: Iterable[str] = ()) -> list[QualityCheck]:
    """Every verdict the run's stages wrote into their status objects, worst first.

    `exclude` names stages to leave out (the evaluator gathers all but its own, whose
    status still holds the previous evaluation's verdicts while it runs).
    """
    skipped = set(exclude)
    checks: list[QualityCheck] = []
    for key in store.list(layout.status_prefix(run_id)):
        if not key.endswith(".json"):
            continue
        try:
            status = store.get_json(key)
        except (DriftlabError, ValueError):
            continue  # an unreadable status is the registry's concern, not the verdicts'
        if isinstance(status, dict) and status.get("stage") not in skipped:
            checks.extend(from_status(status))
    return worst_first(checks)
