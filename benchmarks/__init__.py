"""Benchmarks: `python -m benchmarks.<name>`; JSON reports (with the device named) go to
benchmarks/results/."""
