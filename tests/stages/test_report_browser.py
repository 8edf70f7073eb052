"""The report opens in a real browser (headless Chromium), offline, with no console error,
every section rendered, the explorer's JavaScript run, and a screenshot written."""

from __future__ import annotations

import shutil
import subprocess
from urllib.parse import quote

from services.evaluator.__main__ import EVALUATE
from services.evaluator.report import SECTION_IDS
from shared import layout
from shared.stage import stage_main
from shared.store import open_store
from tests.evaluator_run import make_run

CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None, "Debian's chromium is not installed (.ci/run installs it)"
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_report_renders_in_headless_chromium(tmp_path):
    store = open_store(tmp_path / "store")
    run_id = make_run(store)
    assert stage_main(EVALUATE, ["--run", run_id, "--store", store.url, "--device", "cpu"]) == 0
    page = (tmp_path / "store" / layout.evaluate_report_html_key(run_id)).as_uri()

    dom = _chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in dom.stdout
    # The explorer's script ran: its selectors are filled and a checkpoint's view is drawn.
    assert "<option" in dom.stdout and "Activation statistics" in dom.stdout
    assert "Most active SAE features" in dom.stdout
    # With no search, the first feature's card is drawn.
    assert '<div id="feature-panel" data-feature="1/' in dom.stdout

    # Search by feature id and by token (report.html#search=... runs a search on load).
    explorer = store.get_json(layout.evaluate_report_json_key(run_id))["explorer"]
    last = list(explorer["features"].values())[-1]
    token = next(
        c["token"] for card in explorer["features"].values() for c in card["contexts"]
        if c["token"] not in "\t\n\x0b\x0c\r "  # JavaScript's trim() drops these
    )  # fmt: skip
    best = {
        key: max(c["activation"] for c in card["contexts"] if c["token"] == token)
        for key, card in explorer["features"].items()
        if any(c["token"] == token for c in card["contexts"])
    }
    expected_by_token = sorted(best, key=lambda key: -best[key])  # the strongest first
    # a plain number is an id in every layer and then a token (the numbers tokenizer's are)
    number = str(last["feature"])
    by_number = {
        key: max(c["activation"] for c in card["contexts"] if c["token"].strip() == number)
        for key, card in explorer["features"].items()
        if any(c["token"].strip() == number for c in card["contexts"])
    }
    expected_by_number = [k for k, card in explorer["features"].items()
                          if str(card["feature"]) == number]  # fmt: skip
    expected_by_number += [k for k in sorted(by_number, key=lambda k: -by_number[k])
                           if k not in expected_by_number]  # fmt: skip
    for query, expected in ((f"L1/{last['feature']}", [f"1/{last['feature']}"]),
                            (token, expected_by_token), (number, expected_by_number)):  # fmt: skip
        found = _chromium(tmp_path, "--dump-dom", f"{page}#search={quote(query)}")
        assert found.returncode == 0, found.stderr[-2000:]
        panel = found.stdout[found.stdout.index('<div id="feature-results">') :]
        assert f"{len(expected)} match" in panel
        assert f'<div id="feature-panel" data-feature="{expected[0]}">' in panel
        for heading in ("Activation histogram", "Top activating contexts", "Output tokens",
                        "Trajectory across checkpoints", "Nearest features"):  # fmt: skip
            assert heading in panel
        assert "<mark>" in panel and "<svg" in panel and "promoted" in panel
    missing = _chromium(tmp_path, "--dump-dom", f"{page}#search=999")
    assert "no shown feature has id or top token" in missing.stdout

    shot = tmp_path / "report.png"
    result = _chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", page)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
