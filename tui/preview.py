"""What the import wizard shows before anything is read for real: formats, counts, record shapes.

Record contents never reach the screen (it may be filmed, or a terminal may log): a record shows
as its shape and the length of each message, e.g. `line 1: messages: user 43 chars, assistant
120 chars`. The parsing itself is the appliance's (`appliance.data.formats`); this only counts.
"""

from __future__ import annotations

from collections import Counter
from itertools import islice
from pathlib import Path

MAX_FILES_COUNTED = 5000
RECORDS_SHOWN = 3


def size_text(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return ""


def describe_input(path: Path) -> list[str]:
    """Lines describing a file or folder to import: formats found, and the first records' shapes."""
    from appliance.data.errors import FileRejected
    from appliance.data.formats import TEXT_FORMATS, ParseOptions, RecordProblem, detect_format, iter_text_records
    from appliance.data.walk import walk_inputs

    if not path.exists():
        return [f"{path} does not exist (is the USB stick mounted?)"]
    counts: Counter[str] = Counter()
    total, first_text, truncated = 0, None, False
    for number, item in enumerate(walk_inputs(path)):
        if number >= MAX_FILES_COUNTED:
            truncated = True
            break
        fmt = "" if item.skip_reason else detect_format(item.path)
        counts[fmt or "skipped/unsupported"] += 1
        total += item.size
        if first_text is None and fmt in TEXT_FORMATS:
            first_text = (item, fmt)
    files = sum(counts.values())
    kinds = ", ".join(f"{n} {fmt}" for fmt, n in counts.most_common())
    lines = [f"{files}{'+' if truncated else ''} files, {size_text(total)}: {kinds or 'no files'}"]
    if first_text is None:
        if counts.get("dicom") or counts.get("image"):
            lines.append("images are de-identified on import; the dry run shows what would be quarantined")
        return lines
    item, fmt = first_text
    lines.append(f"first records of {item.rel} ({fmt}; contents hidden):")
    try:
        for record in islice(iter_text_records(item.path, fmt, ParseOptions()), RECORDS_SHOWN):
            if isinstance(record, RecordProblem):
                lines.append(f"  {record.where}: not importable: {record.reason}")
            else:
                shape = ", ".join(f"{role} {len(content)} chars" for role, content in record.messages)
                lines.append(f"  {record.where}: {record.shape}: {shape}")
    except FileRejected as exc:
        lines.append(f"  the file cannot be imported: {exc.reason}")
    return lines


def suggested_name(path: Path) -> str:
    """A dataset name from a file or folder name: lowercase letters, digits, '.', '_' and '-'."""
    stem = path.stem if path.is_file() else path.name
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in stem.lower()).strip("-._")
    return cleaned[:64]
