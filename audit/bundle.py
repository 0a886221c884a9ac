"""The final audit bundle, assembled in one place: train.py's final audit (the selected checkpoint on
the test split) and evaluate.py (a checkpoint, an existing model or a file of embeddings) both end with
`final_bundle`; the audit callbacks' results are put together by `callback_sections`.

The bundle is audit.result's: audit.json, recall_vs_n.png (with a re-linkage section) and report.md,
plus the headline and table logged once (aggregate numbers only, never report text).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from cxr_relink.audit import result as R

log = logging.getLogger(__name__)


def callback_sections(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The audit callbacks' results (their ``last_result``: one audit.result.build_result dict each, in
    callback order) put together: the first non-empty ``relinkage``, ``probe`` and ``report_quality``
    sections; ``settings`` {"relinkage", "probe"} of the callbacks that gave them (None when none did;
    "report_quality" too when there is one); ``meta``, a copy of the re-linkage result's meta (else the
    probe's, else the first result's; {} without results); and ``skipped``, every result's skipped audits
    {name: reason} merged."""
    rel = next((r for r in results if r.get("relinkage")), None)
    probe = next((r for r in results if r.get("probe")), None)
    rq = next((r for r in results if r.get("report_quality")), None)
    settings: dict[str, Any] = {"relinkage": rel["settings"] if rel else None, "probe": probe["settings"] if probe else None}
    if rq:
        settings["report_quality"] = rq["settings"]
    first = rel or probe or (results[0] if results else None)
    return {
        "relinkage": rel["relinkage"] if rel else None,
        "probe": probe["probe"] if probe else None,
        "report_quality": rq["report_quality"] if rq else None,
        "settings": settings,
        "meta": dict(first["meta"]) if first else {},
        "skipped": {k: v for r in results for k, v in (r["meta"].get("skipped") or {}).items()},
    }


def final_bundle(out_dir: str | os.PathLike, meta: dict[str, Any], settings: dict[str, Any], *,
                 relinkage: dict[str, Any] | None = None, probe: dict[str, Any] | None = None,
                 report_quality: dict[str, Any] | None = None, adaptive: dict[str, Any] | None = None,
                 privacy: dict[str, Any] | None = None, logger: logging.Logger | None = None) -> dict[str, Any]:
    """Build the result (audit.result.build_result: schema-checked), write the bundle into ``out_dir``
    (audit.result.write_bundle) and log its headline and table once on ``logger``. ``privacy``: a DP
    model's privacy statement, put next to the numbers it qualifies. Returns the result."""
    res = R.build_result(relinkage=relinkage, probe=probe, meta=meta, settings=settings, privacy=privacy,
                         report_quality=report_quality, adaptive=adaptive)
    R.write_bundle(res, out_dir)
    (logger or log).info("%s", R.console_summary(res, out_dir))
    return res
