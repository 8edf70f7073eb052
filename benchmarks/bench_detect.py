"""Benchmark: the SAE-tracking hallucination detector against its baselines, one run.

Runs a spec (default configs/facts-detect.yaml) through train -> extract -> sae train ->
detect in this process, then prints one JSON object per detector and baseline: its test
AUROC with the bootstrap 95% CI, and `ratio_to_detector` (the detector's AUROC over this
score's), all measured side by side on the same answers and the same question-level
split; then, for the SAE detector and the combined one (SAE signals + the model's own
baselines), the AUROC difference to the best baseline on the test split with its paired
bootstrap 95% CIs, resampling questions (`beats_best_baseline`: that CI lies above 0) and,
too narrow, answers. A last line compares the
detector with GhostTrack's stated target (AUROC 0.90).
Whatever the numbers are, they are what this run reached; a detector that loses to the
dense probe is a finding, not a failure of the benchmark.

Usage: python benchmarks/bench_detect.py [--spec configs/facts-detect.yaml]
       [--store DIR] [--set key=value ...] [--device auto|cpu|cuda] [--run RUN_ID]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from services.extractor.__main__ import EXTRACT
from services.sae.__main__ import DETECT
from services.sae.__main__ import TRAIN as SAE_TRAIN
from services.trainer.__main__ import TRAIN
from shared import layout
from shared.registry import create_run
from shared.spec import apply_overrides, load_spec, parse_overrides
from shared.stage import load_run_spec, stage_main
from shared.store import open_store

GHOSTTRACK_TARGET_AUROC = 0.90


def _rounded(ci: list[float] | None) -> list[float] | None:
    return None if ci is None else [round(v, 4) for v in ci]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--spec", default="configs/facts-detect.yaml")
    parser.add_argument("--store", help="store folder (default: a temporary one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--run", metavar="RUN_ID", help="continue this run of --store (finished stages cached)"
    )
    args = parser.parse_args(argv)

    store = open_store(args.store or tempfile.mkdtemp(prefix="bench-detect-"))
    if args.run:
        spec = load_run_spec(store, args.run)
        run_id = args.run
    else:
        spec = apply_overrides(load_spec(args.spec), parse_overrides(args.set))
        run_id = create_run(store, spec)
    common = ["--run", run_id, "--store", store.url, "--device", args.device]
    seconds: dict[str, float] = {}
    for name, stages, argv_ in (
        ("train", TRAIN, common),
        ("extract", EXTRACT, common),
        ("sae", [SAE_TRAIN, DETECT], ["train", *common]),
        ("detect", [SAE_TRAIN, DETECT], ["detect", *common]),
    ):
        t0 = time.perf_counter()
        code = stage_main(stages, argv_)
        seconds[name] = round(time.perf_counter() - t0, 1)
        if code:
            print(json.dumps({"case": spec.run.name, "failed_stage": name, "exit_code": code}))
            return code

    metrics = store.get_json(layout.detect_metrics_key(run_id))
    detector = metrics["scores"]["detector"]["auroc"]
    common_fields = {
        "case": spec.run.name,
        "run_id": run_id,
        "sizes": metrics["sizes"],
        "class_balance": {k: v for k, v in metrics["class_balance"].items() if k != "train"},
    }
    for name, m in metrics["scores"].items():
        if m["kind"] == "signal":
            continue
        line = {
            **common_fields,
            "name": name,
            "kind": m["kind"],
            "test_auroc": round(m["auroc"], 4),
            "ci95": None if m["ci95"] is None else [round(v, 4) for v in m["ci95"]],
            "ratio_to_detector": round(detector / m["auroc"], 4) if m["auroc"] else None,
        }
        if name == "baseline_dense_probe":
            line["layer"] = metrics["best_dense_layer"]
        print(json.dumps(line), flush=True)
    versus = metrics["against_best_baseline"]
    for name in ("detector", "detector_combined"):
        entry = versus[name]
        print(json.dumps({
            **common_fields,
            "name": f"{name}_vs_best_baseline",
            "best_baseline": versus["baseline"],
            "best_baseline_test_auroc": round(versus["auroc"], 4),
            "auroc_difference": round(entry["auroc_difference"], 4),
            "questions": versus["questions"],
            "paired_ci95_by_question": _rounded(entry["ci95"]),
            "paired_ci95_by_answer": _rounded(entry["ci95_by_answer"]),
            "beats_best_baseline": entry["beats_baseline"],
        }), flush=True)  # fmt: skip
    best_signal = max(
        (n for n, m in metrics["scores"].items() if m["kind"] == "signal"),
        key=lambda n: metrics["scores"][n]["auroc"],
    )
    print(
        json.dumps(
            {
                "case": spec.run.name,
                "name": "ghosttrack_target",
                "detector_test_auroc": round(detector, 4),
                "target_auroc": GHOSTTRACK_TARGET_AUROC,
                "ratio_to_target": round(detector / GHOSTTRACK_TARGET_AUROC, 4),
                "best_signal_chosen_on_test": best_signal,
                "best_signal_test_auroc": round(metrics["scores"][best_signal]["auroc"], 4),
                "stage_seconds": seconds,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
