"""GREEN's clinically significant error categories (Ostmeier et al., 2024): its letters (a)-(f) and the
exact counter's categories (audit/report_quality.py) that map to each. Shared by the exact counts and by
GREEN scored by its language model (audit/green_model.py), which both import it from here."""

from __future__ import annotations

# GREEN's sub-categories (a)-(f).
LETTERS = ("a", "b", "c", "d", "e", "f")

# GREEN's clinically significant error categories, as audit/report_quality.py counts them, with GREEN's letter.
ERROR_CATEGORIES = {
    "false_finding": "a",
    "missed_finding": "b",
    "wrong_location": "c",
    "wrong_device_position": "c",
    "wrong_severity": "d",
    "false_comparison": "e",
    "missed_comparison": "f",
}
