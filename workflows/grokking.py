"""Grokking on a+b mod p: a phase transition to find in the drift and the HMM states.

driftlab submit workflows/grokking.py [--profile auto|gpu|cpu] --store URL [--wait]   # or: python workflows/grokking.py
hera generate yaml workflows/grokking.py   # render it (fixed run ids, registered by nothing)
"""

import sys

from workflows.commands import script_main
from workflows.submission import pipeline_builder, preview

build = pipeline_builder("grokking.yaml")
workflow = preview(build)  # what `hera generate yaml` renders; no run id is drawn

if __name__ == "__main__":
    sys.exit(script_main())
