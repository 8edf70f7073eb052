"""The evaluate stage's work: gather the run's results, write report.json, PNGs and HTML."""

from __future__ import annotations

from services.evaluator.report import render_html
from services.evaluator.sections import Report, build
from shared import layout
from shared.stage import StageContext
from shared.store import Store


def write_report(store: Store, report: Report) -> str:
    """Figures first, then report.json, then the page: the page is the last thing written."""
    run_id = report.run_id
    for name, png in report.figures.items():
        store.put_bytes(layout.evaluate_plot_key(run_id, name), png)
    store.put_json(layout.evaluate_report_json_key(run_id), report.to_json())
    key = layout.evaluate_report_html_key(run_id)
    store.put_text(key, render_html(report))
    return key


def evaluate(ctx: StageContext) -> None:
    """The stage's `run`."""
    with ctx.progress(total=2, unit="part") as progress:
        report = build(ctx.store, ctx.run_id, ctx.spec, ctx.device)
        progress.update(1)
        key = write_report(ctx.store, report)
        progress.update(1)
    ctx.judge(*report.own_checks)
    detector = report.data.get("detection", {}).get("scores", {}).get("detector", {})
    ctx.headline.update(
        absent=sorted(report.absent),
        detector_auroc=detector.get("auroc"),
        hmm_states=report.data.get("hmm", {}).get("n_states"),
        quality_fails=report.data["quality_summary"]["fail"],
        quality_warns=report.data["quality_summary"]["warn"],
    )
    ctx.log.info("report: %s", ctx.store.url_of(key))
