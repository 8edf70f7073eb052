"""The OT stage: optimal-transport drift between layers and checkpoints.

The science core knows nothing of stores, specs or Argo. `services.ot.sinkhorn` is the
batched entropic OT solver's public API (`sinkhorn_cost`), built on `cost` (the normalised
cost), `options` (solver settings), `engine` (waves, chunks, workers) and `chunk_solver`
(the iteration); `emd` is exact OT for small clouds and `sliced` sliced Wasserstein.
`services.ot.pairwise` turns pairs of clouds into drift values (`pairwise_drift`, the entry
point the stage uses; the debiased Sinkhorn divergence) and `services.ot.drift` plans a
run's pairs (`depth_time_pairs`) and computes its drift matrices.
"""
