"""Stage 3: differentially private alignment of the projection heads on cached frozen-encoder features.

losses.py      the three loss modes and their sensitivity derivations
accounting.py  Opacus' accountants used explicitly + an independent RDP computation
features.py    feature caching, privacy units, the feature datamodules
module.py      DPAlignmentModule (Opacus wired by hand for Lightning 2.x)

Its empirical checks (member vs non-member linkage, the one-run epsilon lower bound) are audits:
audit/membership.py and audit/one_run.py.
"""

from cxr_relink.models.dp.losses import LOSS_MODES, SENSITIVITY_FACTOR, VALID_DP_MODES

__all__ = ["LOSS_MODES", "SENSITIVITY_FACTOR", "VALID_DP_MODES"]
