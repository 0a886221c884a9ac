"""What the entry points print: library messages that are known to be harmless here are filtered,
each with the reason, so the ones that remain deserve attention (docs/configs.md lists both).

Filtered (message start -> why it is harmless in this project):
- Opacus "Secure RNG turned off": Opacus means its own noise generator. We never use it: noise and
  Poisson sampling come from generators seeded from the OS entropy pool (models/dp/module.py), and
  the run logs that source; secure_mode (torchcsprng) remains an option (docs/dp.md).
- Opacus "Optimal order is the largest alpha" / "smallest alpha": the RDP bound is minimised at the
  edge of the order grid, so epsilon is slightly *larger* than the grid-free optimum: still a valid
  upper bound (conservative), never an under-statement. Use accountant=prv for a tight figure.
- torch "Full backward hook is firing when gradients are computed with respect to module outputs
  since no inputs require gradients": the DP heads' inputs are cached, frozen features by design;
  Opacus' per-sample gradients of the head weights are unaffected (tested against per-example
  autograd in tests/test_dp.py).
- Lightning "Found N module(s) in eval mode at the start of training": the frozen towers are kept
  in eval mode on purpose (models/dual_tower.py, models/dp/module.py: no dropout in a fixed feature map).
- Lightning "`isinstance(treespec, LeafSpec)` is deprecated": internal to Lightning's pytree use
  with this torch release; nothing to act on in user code.
- Lightning's "Tip: ... litlogger" / "litmodels" advertisements (info messages, not warnings).

Everything else is left visible. Common ones that remain and mean something: "The number of training
batches (n) is smaller than the logging interval" (tiny debug runs: set trainer.log_every_n_steps),
"does not have many workers" (raise data.num_workers when cores allow).
"""

from __future__ import annotations

import logging
import sys
import warnings

KNOWN_HARMLESS = (
    r"Secure RNG turned off",
    r"Optimal order is the (largest|smallest) alpha",
    r"Full backward hook is firing when gradients are computed with respect to module outputs",
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("Tip:" in msg and ("litlogger" in msg or "litmodels" in msg))


def route_lightning_logs() -> None:
    """Lightning's log lines once, through the run's own handlers. On import Lightning gives the
    `lightning` logger a console handler of its own (and, when nothing has configured logging yet, as in
    train.py, also lightning.pytorch / lightning.fabric, which then stop propagating). Under Hydra's
    logging every Lightning line was printed twice (its "INFO: ..." copy and ours) or, in train.py,
    never reached <run>/<task>.log. Once the root logger has handlers, Lightning's own ones are removed
    and its loggers propagate to them. Idempotent; a no-op until Lightning is imported."""
    if "lightning" not in sys.modules or not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's plain console handlers, nothing else
                logger.removeHandler(handler)
        logger.propagate = True


def quiet_known_warnings() -> None:
    """Install the filters above (idempotent) and route Lightning's log lines (route_lightning_logs);
    train.py and evaluate.py call it at start-up (evaluate.py again once it has imported Lightning)."""
    route_lightning_logs()
    for pattern in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=f".*{pattern}")
    # Lightning routes rank_zero_warn through the `warnings` module (covered above) and its
    # rank_zero_info tips through this logger.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTip) for f in logger.filters):
            logger.addFilter(_DropTip())
