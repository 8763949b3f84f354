"""The aggregator process: client registry, round workflow, strategies."""
