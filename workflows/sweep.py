"""A sweep on the cluster: one pipeline per run of `driftlab sweep`'s expansion.

The lr x seed grid of configs/sweeps/lr-seeds.yaml over configs/tiny-cpu.yaml, at most
DEFAULT_SWEEP_PARALLELISM runs at a time; copy this module for another base or sweep.

    driftlab submit workflows/sweep.py [--profile auto|gpu|cpu] --store URL [--wait]   # or: python workflows/sweep.py
    hera generate yaml workflows/sweep.py   # render it (fixed run ids, registered by nothing)
"""

import sys

from workflows.commands import script_main
from workflows.submission import preview, sweep_builder

build = sweep_builder("tiny-cpu.yaml", "lr-seeds.yaml")
workflow = preview(build)  # what `hera generate yaml` renders; no run id is drawn

if __name__ == "__main__":
    sys.exit(script_main())
