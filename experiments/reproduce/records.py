"""The run records a reproduction keeps, and how its audit results are read: what rendering and plotting take
as input (runner.py fills them in by running or by loading kept seeds; nothing here runs anything)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.reproduce.plan import ADAPTIVE_AUX


@dataclass
class Run:
    name: str
    entry: str  # train | evaluate
    overrides: list[str]  # the claim's own overrides (named in RESULTS.md)
    sizing: list[str]  # the scale's overrides
    out: Path
    result: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> str:
        return f"python {self.entry}.py " + " ".join(self.overrides)

    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoints" / "last.ckpt"


def dp_record(run: Run | None) -> dict:
    """The DP record of a run's audit JSON (empty for a non-private run): the one home of ε, kept with
    the audit JSON, where a reused run's metrics are not."""
    rec = ((run.result or {}).get("privacy") or {}) if run else {}
    return rec if rec.get("enabled") else {}


# --------------------------------------------------------------------------- reading audit results


def recall(res: dict | None, key: str = "i2t", k: int = 1, n: str = "100") -> dict | None:
    if not res or key not in res.get("relinkage", {}):
        return None
    for row in res["relinkage"][key]["recall"]:
        if row["k"] == k and str(row["n"]) == str(n):
            return row
    return None


def pool_sizes(res: dict | None, key: str = "i2t") -> list[str]:
    """The N labels a result holds, by increasing pool size ("full" last)."""
    if not res or key not in res.get("relinkage", {}):
        return []
    rows = sorted({(r["n_value"], str(r["n"])) for r in res["relinkage"][key]["recall"]}, key=lambda t: (t[1] == "full", t[0]))
    return [n for _, n in rows]


def probe_row(res: dict | None) -> dict | None:
    """Macro AUROC of a result's linear probe, as a row that `stat` reads."""
    probe = (res or {}).get("probe")
    if not probe or probe.get("macro_auroc") is None:
        return None
    return {"value": probe["macro_auroc"], "ci": probe.get("macro_auroc_ci")}


def headline_n(res: dict | None) -> str:
    """N = 100 where the split allows it, else the full database."""
    return "100" if recall(res, n="100") else "full"


def rows_of(results: list[dict | None], key: str = "i2t", n: str = "100") -> list[dict | None]:
    return [recall(r, key, n=n) for r in results]


def values(rows: list[dict | None], key: str = "value") -> list[float | None]:
    return [None if r is None else r.get(key) for r in rows]


def x_high(rows: list[dict | None]) -> float | None:
    """× chance's range ends at 1 / chance (R@1 = 1): N / K, or the effective pool / K."""
    ch = [r["chance"] for r in rows if r and r.get("chance")]
    return 1.0 / min(ch) if ch else None


def adaptive_row(res: dict | None, attack: str, n: str) -> dict | None:
    """The adaptive audit's R@1 row at N for one pre-specified attack (ADAPTIVE_AUX's auxiliary set;
    the baseline cosine has none). Not its "best" row: that maximum is selected on the audited split."""
    for row in ((res or {}).get("adaptive") or {}).get("rows", []):
        if row["attack"] == attack and (attack == "cosine" or (row["aux"], str(row["n_aux_requested"])) == ADAPTIVE_AUX):
            return recall({"relinkage": row.get("relinkage") or {}}, "i2t", n=n)
    return None


# --------------------------------------------------------------------------- one reproduction's records


@dataclass
class Records:
    """Every run record of one reproduction, by name ("<tag>/s<seed>"), and what RESULTS.md states about how
    they were obtained. Rendering is a function of this alone."""

    scale_name: str
    seeds: list[int]
    out: Path  # the runs' output folder (written as <out> in the configs shown)
    epsilon: float  # the DP arms' target ε
    runs: dict[str, Run] = field(default_factory=dict)
    aliases: set[str] = field(default_factory=set)  # names that point at another run (not listed twice)
    keep: Path | None = None  # where seeds are kept across sessions
    kept: dict[int, str] = field(default_factory=dict)  # seed -> "complete" | "partial" (loaded from keep)
    # (protocol, seed) -> that kept seed's (run name, audit result) pairs, for seeds of an older protocol: the
    # appendix only, never a verdict
    old: dict[tuple[int, int], list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    n_ran: int = 0  # runs executed by this invocation
    rebuilt_check: dict[str, str] = field(default_factory=dict)  # run name -> its re-run's audit against the kept one
    frontier: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm -> kept frontier record (beyond.py)
    frontier_dir: Path | None = None

    def load_frontier(self, folder: Path) -> None:
        """The privacy-utility frontier's kept arms (experiments/frontier.py writes one JSON per arm)."""
        import json

        self.frontier_dir = folder
        self.frontier = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}

    # ------------------------------------------------------------------ reading runs by tag, over seeds

    def has(self, prefix: str) -> list[int]:
        return [s for s in self.seeds if f"{prefix}/s{s}" in self.runs]

    def results(self, prefix: str) -> list[dict | None]:
        return [self.runs[f"{prefix}/s{s}"].result if f"{prefix}/s{s}" in self.runs else None for s in self.seeds]

    def cfg_of(self, prefix: str) -> str:
        s = next((s for s in self.seeds if f"{prefix}/s{s}" in self.runs), None)
        if s is None:
            return "– (not run yet)"
        r = self.runs[f"{prefix}/s{s}"]
        if r.error and r.error.startswith("not available"):
            return f"– ({r.error})"
        cmd = r.command.replace(f"seed={s}", "seed=<s>").replace(f"/s{s}/", "/s<s>/")
        return f"`{cmd.replace(str(self.out), '<out>')}`"

    def status(self, prefix: str) -> str | None:
        errs = [self.runs[f"{prefix}/s{s}"].error for s in self.has(prefix) if self.runs[f"{prefix}/s{s}"].error]
        if not self.has(prefix):
            return "not run yet"
        return errs[0] if errs else None

    def seed_minutes(self) -> str:
        """Summed run time of each seed (kept seeds: as recorded when they ran)."""
        return ", ".join(f"s{s} {sum(r.seconds for n, r in self.runs.items() if n.endswith(f'/s{s}') and n not in self.aliases) / 60:.0f} min"
                         for s in self.seeds)

    def dp_n(self) -> str:
        """Claim 4's pool: N = 10,000 as in arXiv 2606.02276 where the test split reaches it, else the full DB."""
        return "10000" if any(recall(r, n="10000") for r in self.results("base")) else "full"

    def seed_header(self) -> str:
        return " | ".join(f"seed {s}" for s in self.seeds)

