"""`python -m experiments.reproduce ...` (cli.py)."""

from experiments.reproduce.cli import main

main()
