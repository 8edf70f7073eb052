"""`shared.log`: every line names its stage and run, in text or JSON."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import NoReturn

import pytest

from shared.errors import DriftlabError
from shared.log import configure_logging, get_logger, log_event


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """configure_logging changes the root logger; give the next test the one it had."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def _reject(constant: str) -> NoReturn:
    pytest.fail(f"non-standard JSON constant {constant}")


def test_text_lines_carry_stage_and_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DRIFTLAB_LOG_FORMAT", raising=False)
    configure_logging()
    log = get_logger("train", "run-1")
    log.info("started %d steps", 3)
    log_event(log, "checkpoint saved", step=100, path="a b")
    get_logger("sae", "run-1", shard="layer-03").warning("slow")
    lines = _lines(capsys)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ INFO train run=run-1 started 3 steps", lines[0]
    )
    assert lines[1].endswith('INFO train run=run-1 checkpoint saved step=100 path="a b"')
    assert lines[2].endswith("WARNING sae run=run-1 shard=layer-03 slow")


def test_json_lines_parse_with_context_and_fields(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLAB_LOG_FORMAT", "json")
    configure_logging()
    log = get_logger("train", "run-1")
    log_event(log, "step", level="debug", step=1)  # below INFO: not shown
    log.info("saved", extra={"fields": {"step": 100, "loss": float("nan"), "msg": "x"}})
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("failed")
    first, second = (json.loads(line, parse_constant=_reject) for line in _lines(capsys))
    assert first["stage"] == "train" and first["run_id"] == "run-1"
    assert first["level"] == "INFO" and first["msg"] == "saved"
    assert first["step"] == 100 and first["loss"] == "nan" and first["field_msg"] == "x"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first["ts"])
    assert second["level"] == "ERROR" and "ValueError: bad" in second["exc"]


def test_configure_logging_is_idempotent(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DRIFTLAB_LOG_FORMAT", raising=False)
    configure_logging()
    configure_logging("WARNING")
    log = get_logger("ot", "run-2")
    log.info("hidden")
    log.warning("shown")
    assert len(_lines(capsys)) == 1


def test_other_libraries_use_their_logger_name(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DRIFTLAB_LOG_FORMAT", raising=False)
    configure_logging()
    logging.getLogger("urllib3.connectionpool").warning("retrying")
    assert _lines(capsys)[0].endswith("WARNING urllib3.connectionpool retrying")


def test_unknown_format_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLAB_LOG_FORMAT", "yaml")
    with pytest.raises(DriftlabError, match="DRIFTLAB_LOG_FORMAT"):
        configure_logging()
