"""The evaluator: detection metrics, training phases, the run's report and comparisons."""
