"""Synthetic workloads with ground truth: a simulated population emitting Segment-spec messages."""
