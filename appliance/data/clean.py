"""Text cleaning: Unicode NFC, control characters, HTML, whitespace, length limits.

Every change is counted by kind (`Counter`), so the report can say "HTML removed from 212
records" rather than silently rewriting data. Counts are per record changed, not per character.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from appliance.data.formats import TextRecord

# C0/C1 controls except tab and newline, plus invisible format characters that break tokenizers
# (zero-width space/joiners, BOM, bidi overrides: the latter also hide text from reviewers).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_HTML_HINT = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?/?>|&(#\d+|#x[0-9a-fA-F]+|[a-zA-Z]{2,8});")
_HTML_DROP = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.S | re.I)
_HTML_BREAK = re.compile(r"<\s*(br|/p|/div|/li|/tr|/h[1-6])\b[^>]*>", re.I)
_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?/?>")
_SPACES = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class CleanOptions:
    """Cleaning and length limits, applied to each record's total text."""

    strip_html: bool = True
    """Remove HTML tags and decode entities (reports exported from web systems carry markup)."""
    min_chars: int = 1
    """Records shorter than this after cleaning count as cleaned-empty."""
    max_chars: int = 1_000_000
    """Records longer than this after cleaning are rejected (they would be truncated in training)."""

    def __post_init__(self) -> None:
        if self.min_chars < 1 or self.max_chars < self.min_chars:
            raise ValueError("need 1 <= min_chars <= max_chars")


def clean_text(text: str, counts: Counter[str], *, strip_html: bool = True) -> str:
    """One string, cleaned; `counts` gains one per kind of change made."""
    out = text
    normalized = unicodedata.normalize("NFC", out)
    if normalized != out:
        counts["unicode_nfc"] += 1
        out = normalized
    if "\r" in out:
        out = out.replace("\r\n", "\n").replace("\r", "\n")
    stripped = _CONTROL.sub("", out)
    if stripped != out:
        counts["control_chars"] += 1
        out = stripped
    if strip_html and _HTML_HINT.search(out):
        unhtml = _HTML_DROP.sub("", out)
        unhtml = _HTML_BREAK.sub("\n", unhtml)
        unhtml = html.unescape(_HTML_TAG.sub("", unhtml))
        if unhtml != out:
            counts["html"] += 1
            out = _CONTROL.sub("", unhtml)
    spaced = _BLANK_LINES.sub("\n\n", "\n".join(_SPACES.sub(" ", line).strip() for line in out.split("\n"))).strip()
    if spaced != out:
        counts["whitespace"] += 1
        out = spaced
    return out


@dataclass(frozen=True)
class Cleaned:
    """Outcome of `clean_record`: a record, or why it was dropped ('empty'/'too_short'/'too_long')."""

    record: TextRecord | None
    dropped: str = ""


def clean_record(record: TextRecord, counts: Counter[str], options: CleanOptions) -> Cleaned:
    """Clean every message; drop empty messages; judge the length of what is left."""
    messages = []
    for role, content in record.messages:
        cleaned = clean_text(content, counts, strip_html=options.strip_html)
        if cleaned:
            messages.append((role, cleaned))
    if len(messages) != len(record.messages):
        counts["empty_messages_dropped"] += 1
    # A conversation needs something to learn from: at least one non-system turn.
    if not any(role != "system" for role, _ in messages):
        return Cleaned(None, "empty")
    total = sum(len(content) for _, content in messages)
    if total < options.min_chars:
        return Cleaned(None, "too_short")
    if total > options.max_chars:
        return Cleaned(None, "too_long")
    return Cleaned(TextRecord(record.where, record.shape, tuple(messages)))
