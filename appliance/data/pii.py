"""Optional regex scrub of personal data in free text: e-mail, dates, ID numbers, phone numbers.

Off by default; on with `--profile medical`. Regexes catch the structured identifiers that
clinical text is full of; they do not find names, which is why DICOM relies on the Annex E
table instead and why the report says what was replaced, by kind, for a steward to judge.
Order matters: dates before phone numbers, so that 2024-03-05 is a date, not a phone number.
"""

from __future__ import annotations

import re
from collections import Counter

_MONTHS = (r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?")
PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")),
    ("date", re.compile(
        r"\b(?:\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}|\d{1,2}\s+" + _MONTHS + r",?\s+\d{4}|"
        + _MONTHS + r"\s+\d{1,2},?\s+\d{4})\b", re.I)),
    ("id_number", re.compile(
        r"\b\d{3}-\d{2}-\d{4}\b"                                     # US SSN layout
        r"|\b(?:MRN|PID|patient\s*(?:id|no|nr|number)|pat\.?\s*nr\.?|case\s*(?:id|no))[\s:#.]*[A-Z0-9][A-Z0-9-]{3,}\b"
        r"|\b[A-Z]{1,3}\d{6,}\b|\b\d{8,}\b", re.I)),                  # insurance/MRN-like runs
    ("phone", re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s./-]?)?(?:\(\d{1,5}\)[\s./-]?)?"
                         r"\d{2,5}(?:[\s./-]\d{2,6}){1,4}(?!\w)")),
)
_PLACEHOLDER = {"email": "[EMAIL]", "date": "[DATE]", "id_number": "[ID]", "phone": "[PHONE]"}
_MIN_PHONE_DIGITS = 7


def scrub_text(text: str, counts: Counter[str]) -> str:
    """Replace each match with a placeholder ([EMAIL], [DATE], [ID], [PHONE]); count by kind."""
    for kind, pattern in PATTERNS:
        if kind == "phone":
            text = pattern.sub(lambda m: _phone(m, counts), text)
            continue
        text, n = pattern.subn(_PLACEHOLDER[kind], text)
        if n:
            counts[f"pii_{kind}"] += n
    return text


def _phone(match: re.Match[str], counts: Counter[str]) -> str:
    # Short digit groups ("3 x 20 mg", "12 14") are measurements, not phone numbers.
    if sum(ch.isdigit() for ch in match.group()) < _MIN_PHONE_DIGITS:
        return match.group()
    counts["pii_phone"] += 1
    return _PLACEHOLDER["phone"]
