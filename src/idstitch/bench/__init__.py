"""Benchmarks: printed figures (and --json for machines), never timed unit tests."""
