"""Training runs, sweeps and benchmarks built on nmattn."""
