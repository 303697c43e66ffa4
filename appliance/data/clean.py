"""Text cleaning: Unicode NFC, control characters, HTML, whitespace, length limits.

Every change is counted by kind (`Counter`), so the report can say "HTML removed from 212
records" rather than silently rewriting data. Counts are per record changed, not per character.
"""

from __future__ import annotations

import html
import re
import textwrap
import unicodedata
from collections import Counter
from dataclasses import dataclass

from appliance.data.formats import TextRecord

# C0/C1 controls except tab and newline, plus invisible format characters that break tokenizers
# (zero-width space/joiners, BOM, bidi overrides: the latter also hide text from reviewers).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
# Characters that separate lines or pages: they become newlines before controls are removed,
# or "page one<FF>page two" would turn into "page onepage two".
_LINE_BREAKS = re.compile("\r\n?|[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# Only real HTML element names count as tags: code has `vector<int>` and `List<String>`, which
# a generic <name> pattern would delete.
_TAG_NAMES = (r"(?:a|abbr|address|article|aside|b|big|blockquote|body|br|caption|center|cite|code|col|colgroup|dd|"
              r"del|dfn|div|dl|dt|em|figcaption|figure|font|footer|form|h[1-6]|head|header|hr|html|i|img|input|ins|"
              r"kbd|label|li|link|main|mark|meta|nav|o:p|ol|option|p|pre|q|s|samp|section|select|small|span|strike|"
              r"strong|sub|sup|table|tbody|td|textarea|tfoot|th|thead|title|tr|tt|u|ul|var|wbr)")
_HTML_TAG = re.compile(r"</?" + _TAG_NAMES + r"(?:\s[^<>]*)?/?>|<!doctype[^<>]*>", re.I)
_HTML_HINT = re.compile(_HTML_TAG.pattern + r"|<(?:script|style)\b|<!--|&(?:#\d+|#x[0-9a-fA-F]+|[a-zA-Z]{2,8});",
                        re.I)
_HTML_DROP = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.S | re.I)
_HTML_BREAK = re.compile(r"<\s*(br|/p|/div|/li|/tr|/h[1-6])\b[^>]*>", re.I)
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
    broken = _LINE_BREAKS.sub("\n", out)
    if broken != out:
        counts["whitespace"] += 1
        out = broken
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
    spaced = _BLANK_LINES.sub("\n\n", "\n".join(map(_normalize_line, textwrap.dedent(out).split("\n")))).strip("\n")
    if spaced != out:
        counts["whitespace"] += 1
        out = spaced
    return out


def _normalize_line(line: str) -> str:
    """Collapse runs of spaces and drop trailing ones, but keep the indentation: in code (and
    in nested lists) it is meaning, not noise. `textwrap.dedent` has removed what all lines share."""
    indent = line[:len(line) - len(line.lstrip(" \t"))]
    body = _SPACES.sub(" ", line[len(indent):]).strip()
    return indent + body if body else ""


@dataclass(frozen=True)
class Cleaned:
    """Outcome of `clean_record`: a record, or why it was dropped
    ('empty' / 'no_assistant' / 'too_short' / 'too_long')."""

    record: TextRecord | None
    dropped: str = ""


def clean_record(record: TextRecord, counts: Counter[str], options: CleanOptions) -> Cleaned:
    """Clean every message; drop empty messages; judge the length of what is left.

    `counts` gains at most one per kind of change per record, however many messages changed."""
    changes: Counter[str] = Counter()
    messages = []
    for role, content in record.messages:
        cleaned = clean_text(content, changes, strip_html=options.strip_html)
        if cleaned:
            messages.append((role, cleaned))
    if len(messages) != len(record.messages):
        changes["empty_messages_dropped"] += 1
    counts.update(dict.fromkeys(changes, 1))
    # A record needs something to learn from: at least one non-system turn, and in a
    # conversation an assistant turn (training refuses a chat record without one).
    if not any(role != "system" for role, _ in messages):
        return Cleaned(None, "empty")
    if record.shape != "text" and not any(role == "assistant" for role, _ in messages):
        return Cleaned(None, "no_assistant")
    total = sum(len(content) for _, content in messages)
    if total < options.min_chars:
        return Cleaned(None, "too_short")
    if total > options.max_chars:
        return Cleaned(None, "too_long")
    return Cleaned(TextRecord(record.where, record.shape, tuple(messages)))
