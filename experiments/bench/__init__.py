"""Benchmarks: speed as ratios measured in one process on the same inputs."""
