"""Expand a W&B sweep file offline, as `wandb sweep` + `wandb agent` would (no W&B server needed).

The implementation lives in configs/sweep_local.py (the local controller that also *runs* a sweep:
`python -m cxr_relink.configs.sweep_local configs/sweep/dual_tower.yaml --count 2`); this module keeps the
names the tests import and the preview command:

    python -m tests.sweep_sampler configs/sweep/dual_tower.yaml -n 3     # print 3 agent command lines
"""

from __future__ import annotations

from cxr_relink.configs.sweep_local import (  # noqa: F401
    _kind, _ppf, agent_command, as_served, grid_suggestions, hydra_overrides, load_sweep, random_suggestion,
    suggestions,
)


def _main() -> None:
    import argparse
    import shlex

    ap = argparse.ArgumentParser(description="print the command lines a W&B agent would run for a sweep file")
    ap.add_argument("sweep")
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sweep = load_sweep(args.sweep)
    for values in suggestions(sweep, args.n, args.seed):
        print(shlex.join(agent_command(sweep, values)))


if __name__ == "__main__":
    _main()
