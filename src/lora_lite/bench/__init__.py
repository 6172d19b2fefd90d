"""Measurement: generated tasks, cost and quality benchmarks, report tables."""
