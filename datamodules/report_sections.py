"""Split a free-text radiology report into named sections, MIMIC-CXR style.

Behaves like the logic of the official MIMIC-CXR section parser (MIT-LCP/mimic-cxr,
`txt/section_parser.py`), re-implemented here:
- a header is an upper-case phrase at the start of a line followed by a colon
  ("FINDINGS:", "IMPRESSION:", "WET READ:", "FINDINGS AND IMPRESSION:");
  text before the first header is the "preamble";
- header names are normalised: lower-cased, whitespace collapsed, and common variants and
  misspellings mapped to one name ("impressions"/"impresion" -> impression,
  "finding"/"findngs" -> findings, "comparisons" -> comparison, ...);
- when a name occurs more than once (addenda repeat sections) the *last* one wins;
- when neither findings nor impression exists, the report's last paragraph stands in
  (many short reports are a single block under some other header, or no header at all).
Section text is returned whitespace-normalised (the 79-column wrapping joined back into lines).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Line-initial upper-case phrase + colon. Digits are allowed after the first letter ("PA AND LAT
# 2 VIEWS:" style headers exist); at least two characters so "A:" inside lists is not a header.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z0-9 ()/,&'\-]*[A-Z)])[ \t]*:", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")

# Canonical names for frequent variants (after lower-casing and collapsing whitespace).
_ALIASES = {
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "summary": "impression",
    "finding": "findings",
    "comparisons": "comparison",
    "comparison exam": "comparison",
    "comparison film": "comparison",
    "comparison study": "comparison",
    "reference exam": "comparison",
    "indications": "indication",
    "clinical indication": "indication",
    "reason for exam": "indication",
    "reason for examination": "indication",
    "history": "indication",
    "clinical history": "indication",
    "patient history": "indication",
    "clinical information": "indication",
    "exam": "examination",
    "type of examination": "examination",
    "wetread": "wet read",
    "findings/impression": "findings and impression",
    "findings / impression": "findings and impression",
    "impression and findings": "findings and impression",
    "recommendations": "recommendation",
    "recommendation(s)": "recommendation",
    "addenda": "addendum",
}


def _edit_distance_le1(a: str, b: str) -> bool:
    """True when a and b differ by at most one insertion, deletion, substitution or swap."""
    if a == b:
        return True
    la, lb = len(a), len(b)
    if abs(la - lb) > 1:
        return False
    if la == lb:
        diff = [i for i in range(la) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    if la > lb:
        a, b = b, a
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    return a[i:] == b[i + 1 :]


def normalize_header(name: str) -> str:
    """'IMPRESSIONS' -> 'impression', 'FINDNGS' -> 'findings', 'Wet  Read' -> 'wet read'."""
    n = " ".join(name.lower().split())
    n = _ALIASES.get(n, n)
    for canon in ("impression", "findings", "indication", "comparison"):
        # Typos of the headers that matter (impresson, imprression, findins, comparsion, ...).
        if n != canon and len(n) > 5 and (_edit_distance_le1(n, canon) or _edit_distance_le1(n, canon.rstrip("s"))):
            return canon
    return n


@dataclass
class ParsedReport:
    """Sections of one report. `sections` keeps every (name, text) in order, repeats included;
    `by_name` keeps the last of each name."""

    sections: list[tuple[str, str]] = field(default_factory=list)
    by_name: dict[str, str] = field(default_factory=dict)
    findings: str = ""
    impression: str = ""
    last_paragraph: str = ""
    used_fallback: bool = False


def _clean(text: str) -> str:
    return " ".join(text.split())


def parse_report(text: str) -> ParsedReport:
    """Split `text` into sections; findings/impression follow the official parser's rules."""
    out = ParsedReport()
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    headers = list(_HEADER.finditer(text))
    starts = [0] + [m.end() for m in headers]
    names = ["preamble"] + [normalize_header(m.group(1)) for m in headers]
    ends = [m.start() for m in headers] + [len(text)]
    for name, s, e in zip(names, starts, ends):
        body = _clean(text[s:e])
        if name == "preamble" and not body:
            continue
        out.sections.append((name, body))
        out.by_name[name] = body  # last one of a name wins
    # "findings and impression" sections count as both when the separate ones are absent.
    combined = out.by_name.get("findings and impression", "")
    out.findings = out.by_name.get("findings", "") or combined
    out.impression = out.by_name.get("impression", "") or combined
    paragraphs = [p for p in (_clean(p) for p in _PARAGRAPH_BREAK.split(text)) if p]
    if paragraphs:
        last = paragraphs[-1]
        # A last paragraph that is only a header line ("IMPRESSION:") carries no text.
        m = _HEADER.match(last)
        out.last_paragraph = _clean(last[m.end() :]) if m else last
    if not out.findings and not out.impression:
        out.impression = out.last_paragraph
        out.used_fallback = bool(out.last_paragraph)
    return out
