"""The tiny CPU run: every stage in minutes, on a kind cluster without GPUs (or `driftlab run`).

driftlab submit workflows/tiny_cpu.py [--profile auto|gpu|cpu] --store URL [--wait]   # or: python workflows/tiny_cpu.py
hera generate yaml workflows/tiny_cpu.py   # render it (fixed run ids, registered by nothing)
"""

import sys

from workflows.commands import script_main
from workflows.submission import pipeline_builder, preview

build = pipeline_builder("tiny-cpu.yaml")
workflow = preview(build)  # what `hera generate yaml` renders; no run id is drawn

if __name__ == "__main__":
    sys.exit(script_main())
