"""The report opens in a real browser (headless Chromium), offline, with no console error,
every section rendered, the explorer's JavaScript run, and a screenshot written."""

from __future__ import annotations

import shutil
import subprocess

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

    shot = tmp_path / "report.png"
    result = _chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", page)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
