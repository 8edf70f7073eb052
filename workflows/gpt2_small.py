"""GPT-2 small trained from scratch and checkpointed often: the drift study.

driftlab submit workflows/gpt2_small.py [--profile auto|gpu|cpu] --store URL [--wait]   # or: python workflows/gpt2_small.py
hera generate yaml workflows/gpt2_small.py   # render it (fixed run ids, registered by nothing)
"""

import sys

from workflows.commands import script_main
from workflows.submission import pipeline_builder, preview

build = pipeline_builder("gpt2-small.yaml")
workflow = preview(build)  # what `hera generate yaml` renders; no run id is drawn

if __name__ == "__main__":
    sys.exit(script_main())
