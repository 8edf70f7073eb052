"""Grokking on a+b mod p: a phase transition to find in the drift and the HMM states.

driftlab submit workflows/grokking.py [--profile auto|gpu|cpu] [--wait]   # or: python workflows/grokking.py
hera generate yaml workflows/grokking.py                                  # render it
"""

import sys

from workflows.commands import script_main
from workflows.pipeline import Images
from workflows.submission import cluster_store, pipeline_builder

build = pipeline_builder("grokking.yaml")
workflow = build("gpu", store=cluster_store(), images=Images.from_environment()).workflow

if __name__ == "__main__":
    sys.exit(script_main())
