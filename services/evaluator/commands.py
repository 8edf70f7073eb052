"""`driftlab report` and `driftlab compare`: the evaluator from the command line.

Both run the evaluate stage through its contract (the same DONE marker and status as
`python -m services.evaluator`), so a report built by hand and one built by the workflow
are the same object.
"""

from __future__ import annotations

import argparse
import tempfile
import webbrowser
from pathlib import Path

from services.evaluator.__main__ import EVALUATE
from services.evaluator.compare import compare
from shared import layout
from shared.stage import execute
from shared.store import LocalStore, Store, open_store


def _build(store_url: str, run_id: str, force: bool) -> None:
    args = argparse.Namespace(run=run_id, store=store_url, device="auto", force=force)
    code = execute(EVALUATE, args)
    if code:
        raise SystemExit(code)


def _local_path(store: Store, key: str) -> Path:
    """A file the browser can open: the object itself in a local store, else a copy."""
    if isinstance(store, LocalStore):
        return store.root / key
    target = Path(tempfile.mkdtemp(prefix="driftlab-")) / Path(key).name
    store.get_file(key, target)
    return target


def cmd_report(args: argparse.Namespace) -> int:
    run_id = layout.validate_run_id(args.run_id)
    _build(args.store, run_id, force=True)
    store = open_store(args.store)
    key = layout.evaluate_report_html_key(run_id)
    print(store.url_of(key))
    if args.open:
        webbrowser.open(_local_path(store, key).as_uri())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    run_ids = [layout.validate_run_id(r) for r in args.run_ids]
    for run_id in run_ids:
        if not store.exists(layout.evaluate_report_json_key(run_id)):
            _build(args.store, run_id, force=False)
    key, table = compare(store, run_ids)
    print(table)
    print(store.url_of(key))
    return 0
