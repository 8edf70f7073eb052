"""The OT stage: optimal-transport drift between layers and checkpoints.

The science core knows nothing of stores, specs or Argo: `services.ot.sinkhorn` is the
batched entropic OT solver (and exact EMD for small clouds), `services.ot.sliced` sliced
Wasserstein, and `services.ot.pairwise` turns pairs of clouds into drift values
(`pairwise_drift`, the entry point the stage uses; the debiased Sinkhorn divergence).
"""
