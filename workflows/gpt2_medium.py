"""GPT-2 medium, analysis-only (pretrained weights, train.steps 0): the GhostTrack set-up on a GPU cluster.

driftlab submit workflows/gpt2_medium.py [--profile auto|gpu|cpu] [--wait]   # or: python workflows/gpt2_medium.py
hera generate yaml workflows/gpt2_medium.py                                  # render it
"""

import sys

from workflows.commands import script_main
from workflows.pipeline import Images
from workflows.submission import cluster_store, pipeline_builder

build = pipeline_builder("gpt2-medium.yaml")
workflow = build("gpu", store=cluster_store(), images=Images.from_environment()).workflow

if __name__ == "__main__":
    sys.exit(script_main())
