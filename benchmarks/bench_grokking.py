"""Benchmark (science): does drift tracking find grokking's phase transition, on time?

Registers the grokking sweep (default configs/grokking.yaml under
configs/sweeps/grokking-seeds.yaml: three seeds) in a store, carries the runs through the
sweep's workflow here (the graph workflows/sweep.py sends to Argo: train -> extract -> ot,
sae -> evaluate per run, `--parallel N` runs at a time, on the GPU when there is one),
fits one HMM of training phases over the seeds (`driftlab hmm`), rebuilds each run's
report with it, and prints JSON lines:

- one per run: the step at which test accuracy crosses 50% (`grok_step`; grokking is the
  jump from memorised-train-only to generalising), the accuracy jumps, OT change points and
  HMM state changes the report's phase-agreement section found, the OT change points whose
  size exceeds their curve's drift baseline in some layer or in the mean over layers
  (`ot_significant`: the rest are smaller, not necessarily noise), the checkpoints after a training-loss
  spike (`loss_spikes`: Adam's slingshots, in which grokking's jumps happen), how many OT
  change points and loss spikes lie within tolerance of one another (`ot_vs_loss_spikes`),
  and, for each of OT, significant OT, HMM and loss spikes, the boundary nearest the grok
  step with its offset in checkpoints (negative: earlier);
- a summary: how many runs grokked, and in how many of them each source put a
  boundary within `evaluate.phase_tolerance` checkpoints of the grok step.

The reference is the test-accuracy jump itself, measured in the same runs: the offsets
are the comparison. configs/grokking.yaml is the paper's size (p=113, 4k full-batch
steps, the loss on the answer): half an hour per seed on a 2-core CPU, minutes on a GPU.
configs/grokking-cpu.yaml is a smaller modulus that groks on a laptop. --runs skips
training and analyses runs already in --store.

Usage: python benchmarks/bench_grokking.py [--spec configs/grokking.yaml]
       [--sweep configs/sweeps/grokking-seeds.yaml] [--store DIR] [--set key=value ...]
       [--parallel N] [--runs RUN_ID ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from typing import Any

from cli.main import main as driftlab
from services.evaluator.agreement import crossing_step, nearest_boundary
from shared import layout
from shared.errors import DriftlabError
from shared.registry import create_run
from shared.spec import apply_overrides, load_spec, parse_overrides
from shared.stage import load_run_spec
from shared.store import Store, open_store
from shared.sweep import expand, load_sweep
from workflows.commands import run_sweep_registered

#: The boundaries compared with the grok step.
SOURCES = ("ot", "ot_significant", "hmm", "loss_spikes")


def run_sweep(
    store: Store, spec_path: str, sweep_path: str, sets: list[str], parallel: int
) -> list[str]:
    """Register the sweep's runs and carry them through the sweep's workflow here.

    `parallel` pipelines at a time (the runs then share the machine's cores and GPU).
    """
    base = apply_overrides(load_spec(spec_path), parse_overrides(sets))
    sweep = load_sweep(sweep_path)
    run_ids = [create_run(store, spec) for spec in expand(base, sweep)]
    start = time.monotonic()
    print(f"{len(run_ids)} runs, {parallel} at a time", file=sys.stderr, flush=True)
    result = run_sweep_registered(run_ids, store.url, sweep.name, parallel)
    if result.failed is not None:
        raise DriftlabError(
            f"{result.failed.name} {result.failed.state.lower()}: {result.failed.message}; "
            f"logs in {result.log_dir}"
        )
    print(f"{len(run_ids)} runs: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return run_ids


def analyse(store: Store, run_ids: list[str]) -> list[dict[str, Any]]:
    """Fit the HMM over all runs, rebuild their reports, and read each one's phases."""
    with contextlib.redirect_stdout(sys.stderr):  # stdout is this benchmark's JSON lines
        if driftlab(["hmm", "--runs", *run_ids, "--store", store.url]):
            raise DriftlabError("driftlab hmm failed (its error is above)")
        for run_id in run_ids:
            if driftlab(["report", run_id, "--store", store.url]):
                raise DriftlabError(f"driftlab report {run_id} failed (its error is above)")
    lines = []
    for run_id in run_ids:
        report = store.get_json(layout.evaluate_report_json_key(run_id))
        phases = report["phases"]
        checkpoints = phases["checkpoints"]
        accuracy = report["training"]["eval"].get("eval_accuracy") or [None] * len(checkpoints)
        sources = dict(phases["sources"])
        if phases.get("ot_significant") is not None:
            sources["ot_significant"] = [point["step"] for point in phases["ot_significant"]]
        grok = crossing_step(checkpoints, accuracy)
        line: dict[str, Any] = {
            "case": "grokking",
            "run_id": run_id,
            "seed": load_run_spec(store, run_id).run.seed,
            "checkpoints": len(checkpoints),
            "final_test_accuracy": accuracy[-1],
            "grok_step": grok,
            "accuracy_jumps": sources.get("accuracy"),
            "ot_change_points": sources.get("ot"),
            "ot_significant": sources.get("ot_significant"),
            "hmm_state_changes": sources.get("hmm"),
            "hmm_states": report.get("hmm", {}).get("n_states"),
            "loss_spikes": sources.get("loss_spikes"),
            "ot_vs_loss_spikes": _pair(phases["pairs"], "ot", "loss_spikes"),
        }
        for name in SOURCES:
            line[f"{name}_nearest"] = (
                None if grok is None else nearest_boundary(checkpoints, sources.get(name), grok)
            )
        line["tolerance_checkpoints"] = phases["tolerance_checkpoints"]
        lines.append(line)
    return lines


def _pair(pairs: list[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """How many boundaries of `a` and of `b` have one of the other within tolerance."""
    for pair in pairs:
        if {pair["a"], pair["b"]} == {a, b}:
            side = {pair["a"]: "a", pair["b"]: "b"}
            return {
                f"{name}_matched": f"{pair[side[name] + '_matched']} of {pair['n_' + side[name]]}"
                for name in (a, b)
            }
    return None


def summary(lines: list[dict[str, Any]]) -> dict[str, Any]:
    grokked = [line for line in lines if line["grok_step"] is not None]

    def within(name: str) -> int:
        return sum(
            1
            for line in grokked
            if line[f"{name}_nearest"] is not None
            and abs(line[f"{name}_nearest"]["offset_checkpoints"]) <= line["tolerance_checkpoints"]
        )

    out: dict[str, Any] = {
        "case": "grokking-summary",
        "runs": len(lines),
        "grokked": len(grokked),
        "grok_steps": [line["grok_step"] for line in lines],
    }
    for name in SOURCES:
        out[f"{name}_within_tolerance"] = within(name)
        out[f"{name}_offsets_checkpoints"] = [
            (line[f"{name}_nearest"] or {}).get("offset_checkpoints") for line in grokked
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--spec", default="configs/grokking.yaml")
    parser.add_argument("--sweep", default="configs/sweeps/grokking-seeds.yaml")
    parser.add_argument("--store", help="store URL or folder (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", nargs="+", metavar="RUN_ID", help="analyse these runs only")
    parser.add_argument(
        "--parallel", type=int, default=1, metavar="N", help="runs at a time (default 1)"
    )
    args = parser.parse_args(argv)
    store = open_store(args.store or tempfile.mkdtemp(prefix="bench-grokking-"))
    try:
        run_ids = args.runs or run_sweep(store, args.spec, args.sweep, args.set, args.parallel)
        lines = analyse(store, run_ids)
    except DriftlabError as err:
        print(f"bench_grokking: {err}", file=sys.stderr)
        return 1
    for line in [*lines, summary(lines)]:
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
