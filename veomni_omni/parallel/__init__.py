"""Parallel layouts of the model for VeOmni's parallelizer."""
