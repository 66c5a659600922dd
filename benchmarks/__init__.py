"""fstx benchmarks: ``python -m benchmarks`` measures fstx against its baselines."""
