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
  (many short reports are a single block under some other header, or no header at all): the last
  paragraph that holds report text, without header words, so "IMPRESSION:" never stands in as text.
Section text is returned whitespace-normalised (the 79-column wrapping joined back into lines).
A report with no text beyond its headers (`has_text` False: MIMIC's "FINAL REPORT" banner and the
one-line exam header block - EXAMINATION, INDICATION, TECHNIQUE, COMPARISON - do not count) is
empty: readers treat it as an empty report. De-identification marks (MIMIC's `___`, Open-I's `XXXX`)
and punctuation are no text either: a section or report holding only them is empty (`deid_only`
says so), while the report itself keeps them as written.
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
    has_text: bool = False
    deid_only: bool = False  # no text, but de-identification marks where text was (a readers' skip reason)


def _clean(text: str) -> str:
    return " ".join(text.split())


# The exam header block: one-line administrative sections. A report with text only there (and in
# empty FINDINGS/IMPRESSION headers) says nothing about the image: it is empty.
HEADER_BLOCK = frozenset({"examination", "indication", "technique", "comparison"})

# De-identification marks: MIMIC writes "___", Open-I "XXXX" where text was removed. Neither (nor
# the punctuation around them) is report text; text is what keeps a letter or digit without them.
DEID_MARK = re.compile(r"_{2,}|X{3,}")
_WORD = re.compile(r"[^\W_]")  # a letter or digit, in any script


def has_words(text: str | None) -> bool:
    """Whether `text` holds report text: a letter or digit once de-identification marks are removed."""
    return bool(text) and _WORD.search(DEID_MARK.sub(" ", text)) is not None


def section_text(text: str | None, heading: str = "") -> str:
    """A section's text whitespace-normalised, or "" when it holds no words beyond de-identification
    marks and its own heading repeated ("FINDINGS:" under FINDINGS, as some exports write)."""
    body = _clean(text or "")
    if heading:
        body_wo = re.sub(rf"^\s*{re.escape(heading)}\s*:?", "", body, count=1, flags=re.IGNORECASE)
        if not has_words(body_wo):
            return ""
    return body if has_words(body) else ""


# MIMIC's banner line: part of the file layout, not report text.
_BANNER = re.compile(r"^\s*FINAL REPORT\b\s*")


def _strip_banner(text: str) -> str:
    return _clean(_BANNER.sub("", text, count=1))


def _content_by_paragraph(text: str) -> list[str]:
    """Each paragraph's report text: without header words, MIMIC's banner, or the one-line bodies of
    the exam header block ("EXAMINATION: CHEST (PA AND LAT)", "INDICATION: ___ cough"). Text after a
    blank line counts even inside such a section: that is narrative, not a header line."""
    out = []
    current = "preamble"
    for para in _PARAGRAPH_BREAK.split(text):
        pieces: list[str] = []
        matches = list(_HEADER.finditer(para))
        bounds = [(current, False, 0)] + [(normalize_header(m.group(1)), True, m.end()) for m in matches]
        ends = [m.start() for m in matches] + [len(para)]
        for (name, headed, start), end in zip(bounds, ends):
            body = _clean(para[start:end])
            if name == "preamble":
                body = _strip_banner(body)
            if headed and name in HEADER_BLOCK:
                body = ""
            if body:
                pieces.append(body)
            current = name
        out.append(" ".join(pieces))
    return out


def parse_report(text: str) -> ParsedReport:
    """Split `text` into sections; findings/impression follow the official parser's rules."""
    out = ParsedReport()
    # A byte-order mark (an editor's "UTF-8 with BOM") is no text: before a first-line header it hid it.
    text = (text or "").removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
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
    out.findings = section_text(out.by_name.get("findings", "")) or section_text(combined)
    out.impression = section_text(out.by_name.get("impression", "")) or section_text(combined)
    paragraphs = [c for c in _content_by_paragraph(text) if c]
    content = [c for c in paragraphs if has_words(c)]
    out.has_text = bool(content)
    out.deid_only = not content and any(DEID_MARK.search(c) for c in paragraphs)
    # The last paragraph that holds report text: "Lungs clear.\n\nIMPRESSION:" stands in as
    # "Lungs clear.", never as the literal header.
    out.last_paragraph = content[-1] if content else ""
    if not out.findings and not out.impression:
        out.impression = out.last_paragraph
        out.used_fallback = bool(out.last_paragraph)
    return out
