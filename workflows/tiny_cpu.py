"""The tiny CPU run: every stage in minutes, on a kind cluster without GPUs (or `driftlab run`).

driftlab submit workflows/tiny_cpu.py [--profile auto|gpu|cpu] [--wait]   # or: python workflows/tiny_cpu.py
hera generate yaml workflows/tiny_cpu.py                                  # render it
"""

import sys

from workflows.commands import script_main
from workflows.pipeline import Images
from workflows.submission import cluster_store, pipeline_builder

build = pipeline_builder("tiny-cpu.yaml")
workflow = build("gpu", store=cluster_store(), images=Images.from_environment()).workflow

if __name__ == "__main__":
    sys.exit(script_main())
