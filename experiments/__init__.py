"""Experiments: runs that produce the project's results tables (reproduction of both papers' claims,
the DP results, the LLM tower's text evaluations, the canary audit), kept apart from the benchmarks
in bench/ (speed and memory). Run from the repository root as modules: `python -m experiments.reproduce`."""
