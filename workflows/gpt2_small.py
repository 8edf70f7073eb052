"""GPT-2 small trained from scratch and checkpointed often: the drift study.

driftlab submit workflows/gpt2_small.py [--profile auto|gpu|cpu] [--wait]   # or: python workflows/gpt2_small.py
hera generate yaml workflows/gpt2_small.py                                  # render it
"""

import sys

from workflows.commands import script_main
from workflows.pipeline import Images
from workflows.submission import cluster_store, pipeline_builder

build = pipeline_builder("gpt2-small.yaml")
workflow = build("gpu", store=cluster_store(), images=Images.from_environment()).workflow

if __name__ == "__main__":
    sys.exit(script_main())
