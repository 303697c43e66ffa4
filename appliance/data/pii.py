"""Optional regex scrub of personal data in free text: e-mail, dates, ID numbers, phone numbers.

Off by default; on with `--profile medical`. Regexes catch the structured identifiers that
clinical text is full of; they do not find names, which is why DICOM relies on the Annex E
table instead and why the report says what was replaced, by kind, for a steward to judge.
Order matters: dates before phone numbers, so that 2024-03-05 is a date, not a phone number.
"""

from __future__ import annotations

import re
from collections import Counter

# Month names in English and German, spelled out or abbreviated. A bare prefix (the former
# `dec[a-z]*`) also matched words such as "decrease" in "decrease 10 1500 rpm".
_MONTHS = (r"(?:jan(?:uary|uar)?|feb(?:ruary|ruar)?|mar(?:ch)?|m(?:ä|ae)rz|apr(?:il)?|ma[iy]|jun[ei]?|jul[yi]?|"
           r"aug(?:ust)?|sep(?:t(?:ember)?)?|o[ck]t(?:ober)?|nov(?:ember)?|de[cz](?:ember)?)\b\.?")
PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")),
    # (?!\d) rather than \b at the end, so that ISO timestamps (2024-03-05T10:00) are dates too.
    ("date", re.compile(
        r"\b(?:\d{4}[./-]\d{1,2}[./-]\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}|\d{1,2}\.?\s+" + _MONTHS
        + r",?\s+\d{4}|" + _MONTHS + r"\s+\d{1,2},?\s+\d{4})(?!\d)", re.I)),
    # After a label (MRN, PID, patient no, ...) the identifier must hold a digit: "patient no
    # longer" and "PID controller" are words, not identifiers.
    ("id_number", re.compile(
        r"\b\d{3}-\d{2}-\d{4}\b"                                     # US SSN layout
        r"|\b(?:MRN|PID|patient[\s-]*(?:id|no|nr|number)|pat\.?\s*nr\.?|case\s*(?:id|no))[\s:#.]*"
        r"(?=[A-Z-]*\d)[A-Z0-9][A-Z0-9-]{3,}\b"
        r"|\b[A-Z]{1,3}\d{6,}\b|\b\d{8,}\b", re.I)),                  # insurance/MRN-like runs
    # Groups of up to 8 digits: German subscriber numbers (+49 30 1234567) have 7 or 8.
    ("phone", re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s./-]?)?(?:\(\d{1,5}\)[\s./-]?)?"
                         r"\d{2,5}(?:[\s./-]\d{2,8}){1,4}(?!\w)")),
)
_PLACEHOLDER = {"email": "[EMAIL]", "date": "[DATE]", "id_number": "[ID]", "phone": "[PHONE]"}
_MIN_PHONE_DIGITS = 7
_NANP_LOCAL = re.compile(r"\d{3}-\d{4}")


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
    # Short digit groups ("3 x 20 mg", "12 14") are measurements, not phone numbers. Longer runs
    # of numbers ("10 20 30 40", "12.50 13.75") are too, unless they look dialled: an
    # international (+) or trunk (0) prefix, an area code in parentheses, ten or more digits,
    # or the North American 555-1234 layout.
    text = match.group()
    digits = sum(ch.isdigit() for ch in text)
    if digits < _MIN_PHONE_DIGITS:
        return text
    if not (text[0] in "+(0" or digits >= 10 or _NANP_LOCAL.fullmatch(text)):
        return text
    counts["pii_phone"] += 1
    return _PLACEHOLDER["phone"]
