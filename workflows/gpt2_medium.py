"""GPT-2 medium, analysis-only (pretrained weights, train.steps 0): the GhostTrack set-up on a GPU cluster.

driftlab submit workflows/gpt2_medium.py [--profile auto|gpu|cpu] --store URL [--wait]   # or: python workflows/gpt2_medium.py
hera generate yaml workflows/gpt2_medium.py   # render it (fixed run ids, registered by nothing)
"""

import sys

from workflows.commands import script_main
from workflows.submission import pipeline_builder, preview

build = pipeline_builder("gpt2-medium.yaml")
workflow = preview(build)  # what `hera generate yaml` renders; no run id is drawn

if __name__ == "__main__":
    sys.exit(script_main())
