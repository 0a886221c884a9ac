"""The paper reproduction (`python -m experiments.reproduce`; the command and its rules: cli.py's docstring).

    plan.py     what is run: protocol version, scales and their sizing overrides, the runs each claim needs
    runner.py   running the plan with keep/resume bookkeeping (Reproduction, execute)
    records.py  the run records and how an audit result is read (the input of rendering and plotting)
    render.py   RESULTS.md from the records: one function per claim, the head, the appendix
    text.py     the text of cells and verdict sentences
    plot.py     RESULTS_claims.png from the records
    cli.py      the command line (main)

Re-exported here: the names other modules and tests use. Not `execute`: the runner looks it up in runner.py,
so patch it there; not the functions `render` and `plot`: they would hide the modules of the same name.
"""

from experiments.reproduce.cli import main
from experiments.reproduce.plan import (ADAPTIVE, ADAPTIVE_ATTACKS, ADAPTIVE_OVERRIDES, BEFORE_DP, DP_ARMS, EXTERNAL,
                                        PROTOCOL, READINGS, SCALES, TOWERS, TRUNK_ATTACKS, plan_names, scale_overrides)
from experiments.reproduce.records import Records, Run, recall
from experiments.reproduce.runner import Reproduction, audit_json_path, availability, compose_cfg

__all__ = ["ADAPTIVE", "ADAPTIVE_ATTACKS", "ADAPTIVE_OVERRIDES", "BEFORE_DP", "DP_ARMS", "EXTERNAL", "PROTOCOL",
           "READINGS", "Records", "Reproduction", "Run", "SCALES", "TOWERS", "TRUNK_ATTACKS", "audit_json_path",
           "availability", "compose_cfg", "main", "plan_names", "recall", "scale_overrides"]
