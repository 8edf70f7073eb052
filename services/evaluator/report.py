"""`evaluate/report.html`: one file that opens anywhere, offline, with nothing beside it.

Images are inline data URIs, the activation explorer's data is an inline JSON block read
by a few lines of plain JavaScript, and there is no external script, font or stylesheet:
the page can be mailed, archived with the run, or opened from an air-gapped cluster.
"""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any

from services.evaluator.sections import Report

#: Section ids, in page order; the browser test checks every one is rendered.
SECTION_IDS = (
    "spec",
    "training",
    "dynamics",
    "drift",
    "sae",
    "detection",
    "hmm",
    "phases",
    "explorer",
)
TITLES = {
    "spec": "Run spec",
    "training": "Training curves",
    "dynamics": "Training dynamics",
    "drift": "Representation drift (OT)",
    "sae": "Sparse autoencoders",
    "detection": "Hallucination detection",
    "hmm": "HMM training phases",
    "phases": "Phase agreement",
    "explorer": "Activation explorer",
}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.absent{background:#fff6e0;border-left:4px solid #e0a800;padding:.5em 1em}
#quality{padding:.5em 1em;margin:1em 0;border-left:6px solid}
#quality.fail{background:#fde8e8;border-color:#c62828}#quality.warn{background:#fff6e0;border-color:#e0a800}
#quality.ok{background:#e8f5e9;border-color:#2e7d32}#quality li{margin:.2em 0}
.verdict-fail{color:#c62828;font-weight:bold}.verdict-warn{color:#8a6d00;font-weight:bold}
img{max-width:100%}pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em}
nav a{margin-right:1em}
"""

_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById('explorer-data').textContent);
  var stepSel = document.getElementById('explorer-step');
  var layerSel = document.getElementById('explorer-layer');
  var out = document.getElementById('explorer-view');
  function option(sel, value) {
    var o = document.createElement('option');
    o.value = String(value); o.textContent = String(value); sel.appendChild(o);
  }
  data.steps.forEach(function (s) { option(stepSel, s); });
  data.layers.forEach(function (l) { option(layerSel, l); });
  stepSel.value = String(data.steps[data.steps.length - 1]);
  function cell(tag, text) {
    var c = document.createElement(tag); c.textContent = text; return c;
  }
  function table(head, rows) {
    var t = document.createElement('table'), tr = document.createElement('tr');
    head.forEach(function (h) { tr.appendChild(cell('th', h)); });
    t.appendChild(tr);
    rows.forEach(function (r) {
      var row = document.createElement('tr');
      r.forEach(function (v) { row.appendChild(cell('td', v)); });
      t.appendChild(row);
    });
    return t;
  }
  function fmt(v) { return typeof v === 'number' ? v.toPrecision(4) : String(v); }
  function show() {
    out.textContent = '';
    var c = data.cells[stepSel.value + '/' + layerSel.value];
    if (!c) { out.appendChild(cell('p', 'not extracted at this checkpoint')); return; }
    out.appendChild(cell('h3', 'Activation statistics'));
    out.appendChild(table(Object.keys(c.stats),
      [Object.keys(c.stats).map(function (k) { return fmt(c.stats[k]); })]));
    if (!c.features) {
      out.appendChild(cell('p', 'no SAE for this layer'));
      return;
    }
    out.appendChild(cell('h3', 'Most active SAE features and their top probe tokens'));
    var rows = [];
    c.features.forEach(function (f) {
      f.top_tokens.forEach(function (t, i) {
        rows.push([i ? '' : f.feature, i ? '' : fmt(f.mean_activation),
          i ? '' : fmt(f.frequency), JSON.stringify(t.token), t.context,
          fmt(t.activation)]);
      });
    });
    out.appendChild(table(['feature', 'mean act.', 'frequency', 'token', 'context before',
      'activation'], rows));
  }
  stepSel.addEventListener('change', show);
  layerSel.addEventListener('change', show);
  show();
})();
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple) and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.3f}" for v in value) + "]"
    return escape(str(value))


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _spec(r: Report) -> str:
    return f"<pre>{escape(json.dumps(r.data['spec'], indent=2))}</pre>"


def _training(r: Report) -> str:
    t = r.data["training"]
    finals = [["train loss (last logged)", t["final_loss"]]] + [
        [f"{name} (last checkpoint)", value] for name, value in t["final_eval"].items()
    ]
    return _img(r.figures["training"], "training curves") + _table(["metric", "value"], finals)


def _dynamics(r: Report) -> str:
    return _img(r.figures["dynamics"], "training dynamics features")


def _drift(r: Report) -> str:
    d = r.data["drift"]
    parts = [f"<p>{escape(d['note'])}</p>"] if d.get("note") else []
    parts += [_img(png, name) for name, png in r.figures.items() if name.startswith("ot_")]
    cps = [[c["step"], c.get("magnitude"), c.get("exceeds_baseline")] for c in d["change_points"]]
    parts.append("<h3>Change points of the mean drift curve</h3>")
    parts.append(
        _table(["step", "magnitude", "exceeds baseline"], cps) if cps else "<p>none found</p>"
    )
    return "".join(parts)


def _sae(r: Report) -> str:
    layers = r.data["sae"]["layers"]
    cols = ["arch", "d_sae", "relative_depth", "explained_variance", "l0", "dead_fraction"]
    cols.append("ce_loss_recovered")
    return _table(["layer", *cols], [[k, *(v.get(c) for c in cols)] for k, v in layers.items()])


def _detection(r: Report) -> str:
    d = r.data["detection"]
    rows = [
        [name, s["kind"], s["auroc"], s["ci95"], s["pr_auc"], s.get("precision"),
         s.get("recall"), s.get("f1"), s["threshold"], s["n_test"]]
        for name, s in d["scores"].items()
    ]  # fmt: skip
    head = ["score", "kind", "AUROC", "95% CI", "PR-AUC", "precision", "recall", "F1"]
    head += ["threshold", "test answers"]
    detector = d["scores"].get("detector", {}).get("confusion")
    confusion = (
        "<h3>Detector confusion matrix (test)</h3>"
        + _table(
            ["", "predicted hallucinated", "predicted correct"],
            [
                ["hallucinated", detector["tp"], detector["fn"]],
                ["correct", detector["fp"], detector["tn"]],
            ],
        )
        if detector
        else ""
    )
    counts = d["counts"]
    return (
        f"<p>Threshold: {escape(d['threshold_rule'])}, chosen on the train split and applied "
        f"to the test split. No-answer rows excluded: {d['no_answer_excluded']}. "
        f"Test: {counts['test']['hallucinated']} hallucinated, {counts['test']['correct']} "
        "correct.</p>"
        + _table(head, rows)
        + confusion
        + _img(r.figures["detection_roc"], "ROC curves")
        + _img(r.figures["detection_pr"], "precision-recall curves")
    )


def _hmm(r: Report) -> str:
    h = r.data["hmm"]
    rows = [[t["from"], t["to"], t.get("count"), t.get("probability"),
             ", ".join(f"{name} {value:+.2g}" for name, value in t.get("top_features", [])[:3])
             or "none (numerically zero)"] for t in h.get("transitions", [])]  # fmt: skip
    return (
        f"<p>{h.get('n_states')} states, selected by {escape(str(h.get('selected_by')))}"
        + (f"; fitted by <code>driftlab hmm</code> over {len(h['ensemble_of'])} runs: "
           + escape(", ".join(h["ensemble_of"])) if "ensemble_of" in h else ", on this run alone")
        + ".</p>"
        + r.svgs.get("hmm_graph", "")
        + (_img(r.figures["hmm_curves"], "curves coloured by state") if "hmm_curves" in r.figures else "")
        + _table(["from", "to", "count", "probability", "top features"], rows)
    )  # fmt: skip


def _phases(r: Report) -> str:
    p = r.data["phases"]
    sources = [[name, ", ".join(map(str, steps)) or "none"] for name, steps in p["sources"].items()]
    if p.get("ot_significant") is not None:
        significant = [f"{x['step']} ({', '.join(x['curves'])})" for x in p["ot_significant"]]
        sources.append(["ot above its baseline (curves)", ", ".join(significant) or "none"])
    sources += [[name, f"absent: {why}"] for name, why in p["absent_because"].items()]
    pairs = [[f"{x['a']} vs {x['b']}", x["agreement"], f"{x['a_matched']}/{x['n_a']}",
              f"{x['b_matched']}/{x['n_b']}"] for x in p["pairs"]]  # fmt: skip
    return (
        _crossing(p.get("crossing"))
        + (
            _img(r.figures["phases"], "accuracy, drift and HMM states")
            if "phases" in r.figures
            else ""
        )
        + f"<p>Boundaries match when within {p['tolerance_checkpoints']} checkpoint(s).</p>"
        + _table(["source", "boundary steps"], sources)
        + (_table(["pair", "agreement", "a matched", "b matched"], pairs) if pairs else "")
    )


def _crossing(crossing: dict[str, Any] | None) -> str:
    """Where held-out accuracy first reaches 50%, and what OT and the HMM see nearest."""
    if not crossing:
        return ""
    if crossing.get("step") is None:
        return f"<p>Held-out accuracy never reaches {crossing['accuracy']:.0%}.</p>"
    rows = [
        [name, "none" if near is None else near["step"],
         "–" if near is None else f"{near['offset_checkpoints']:+d}"]
        for name, near in crossing["nearest"].items()
    ]  # fmt: skip
    return (
        f"<p>Held-out accuracy first reaches {crossing['accuracy']:.0%} at step "
        f"{crossing['step']}; the nearest boundary of each source, in checkpoints:</p>"
        + _table(["source", "nearest step", "offset"], rows)
    )


def _explorer(r: Report) -> str:
    payload = json.dumps(r.data["explorer"]).replace("</", "<\\/")
    notes = "".join(f"<p>{escape(n)}</p>" for n in r.data["explorer"]["notes"])
    return (
        notes
        + '<label>checkpoint <select id="explorer-step"></select></label> '
        + '<label>layer <select id="explorer-layer"></select></label>'
        + '<div id="explorer-view"></div>'
        + f'<script type="application/json" id="explorer-data">{payload}</script>'
        + f"<script>{_SCRIPT}</script>"
    )


_RENDER = {
    "spec": _spec,
    "training": _training,
    "dynamics": _dynamics,
    "drift": _drift,
    "sae": _sae,
    "detection": _detection,
    "hmm": _hmm,
    "phases": _phases,
    "explorer": _explorer,
}


def _where(check: dict[str, Any]) -> str:
    return f"{check['stage']}[{check['shard']}]" if check.get("shard") else str(check["stage"])


def _quality_banner(r: Report) -> str:
    """The page opens with what not to trust: every fail and warn, with its fix."""
    checks = r.data.get("quality", [])
    bad = [c for c in checks if c["verdict"] != "ok"]
    ok = len(checks) - len(bad)
    if not bad:
        return (f'<div id="quality" class="ok"><strong>Quality: all {ok} checks '
                "passed.</strong></div>")  # fmt: skip
    worst = "fail" if any(c["verdict"] == "fail" for c in bad) else "warn"
    items = "".join(
        f'<li><span class="verdict-{c["verdict"]}">{c["verdict"].upper()}</span> '
        f"{escape(_where(c))} <code>{escape(c['check'])}</code>: {escape(c['message'])}</li>"
        for c in bad
    )
    counts = ", ".join(f"{sum(c['verdict'] == v for c in bad)} {v}" for v in ("fail", "warn"))
    return (
        f'<div id="quality" class="{worst}"><strong>Quality: {counts}, {ok} ok.</strong> '
        f"Read the numbers below with these in mind.<ul>{items}</ul></div>"
    )


def render_html(report: Report) -> str:
    sections = []
    for sid in SECTION_IDS:
        if sid in report.absent:
            body = f'<p class="absent">Absent: {escape(report.absent[sid])}</p>'
        else:
            body = _RENDER[sid](report)
        sections.append(f'<section id="{sid}"><h2>{TITLES[sid]}</h2>{body}</section>')
    nav = "".join(f'<a href="#{sid}">{TITLES[sid]}</a>' for sid in SECTION_IDS)
    title = f"driftlab report: {escape(report.run_id)}"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{title}</h1>{_quality_banner(report)}<nav>{nav}</nav>{''.join(sections)}"
        "</body></html>"
    )
