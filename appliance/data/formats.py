"""Detect and parse text inputs into records: JSONL/JSON, CSV and TXT.

Every record becomes a `TextRecord` of (role, content) messages, whatever shape it came in:

    alpaca             {"instruction", "input"?, "output"}          -> user, assistant
    sharegpt           {"conversations": [{"from", "value"}, ...]}  -> system/user/assistant
    messages (OpenAI)  {"messages": [{"role", "content"}, ...]}
    prompt_completion  {"prompt", "completion"}                     -> user, assistant
    text               {"text"}                                      -> ("text", ...)

A bad record yields a `RecordProblem` naming where it is (line/row/item/block number) and why,
never what it contains. A file that cannot be read at all raises `FileRejected`. Lines are read
with a length cap, so a 200 MB single line costs a bounded amount of memory.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from appliance.data.errors import FileRejected

MiB = 1024 * 1024
TEXT_FORMATS = ("jsonl", "json", "csv", "txt")
_EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
    ".txt": "txt", ".md": "txt", ".log": "txt", ".text": "txt",
    ".dcm": "dicom", ".dicom": "dicom", ".png": "image", ".jpg": "image", ".jpeg": "image",
}
_SHARE_GPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                    "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                    "system": "system", "tool": "tool", "function": "tool"}
_ROLES = {"system", "user", "assistant", "tool", "developer"}
CSV_FIELDS = ("instruction", "input", "output", "prompt", "completion", "text", "system")
# Header sets recognised without --columns, first match wins. Column names compare case-insensitively.
_CSV_AUTO = (
    {"instruction": "instruction", "input": "input", "output": "output"},
    {"prompt": "prompt", "completion": "completion"},
    {"prompt": "question", "completion": "answer"},
    {"text": "text"},
)
# Operators know JSON, not Python: "is null", not "is NoneType".
_JSON_TYPES = {dict: "an object", list: "a list", bool: "a boolean", type(None): "null"}
_SHAPES_HINT = ("expected one of: instruction+output (alpaca), conversations (sharegpt), messages (OpenAI), "
                "prompt+completion, text")


@dataclass(frozen=True)
class TextRecord:
    """One parsed record. `where` locates it in its file; `messages` are (role, content) pairs."""

    where: str
    shape: str
    messages: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RecordProblem:
    """A record that cannot be imported: where it is and why, without its contents."""

    where: str
    reason: str


@dataclass(frozen=True)
class ParseOptions:
    """How text files are read."""

    encoding: str = "utf-8"
    """Text encoding of every file; a file that does not decode is rejected with a hint."""
    max_record_bytes: int = 16 * MiB
    """Longest line/row/document accepted; longer ones are rejected without being held in memory."""
    max_json_file_bytes: int = 64 * MiB
    """Largest `.json` file. It is parsed whole, which costs about three times its size in memory
    (bytes, text, objects), so bigger ones must be converted to JSONL, which streams."""
    txt_split: str = "file"
    """`file`: one document per TXT file; `blocks`: one per blank-line separated block."""
    csv_columns: tuple[tuple[str, str], ...] = ()
    """Explicit CSV mapping (field, column), e.g. (("prompt", "Frage"), ("completion", "Antwort"))."""

    def __post_init__(self) -> None:
        try:
            codecs.lookup(self.encoding)
        except LookupError as exc:
            raise ValueError(f"unknown text encoding {self.encoding!r}") from exc
        # Files are split into lines as bytes (that is what caps a line's memory), which is only
        # right for encodings where b"\n" and the JSON/CSV punctuation mean themselves.
        if '\n,;"{}[]'.encode(self.encoding, "replace") != b'\n,;"{}[]':
            raise ValueError(f"text encoding {self.encoding!r} is not supported; convert the files to UTF-8")
        if self.txt_split not in ("file", "blocks"):
            raise ValueError("txt_split must be 'file' or 'blocks'")
        for field, _column in self.csv_columns:
            if field not in CSV_FIELDS:
                raise ValueError(f"unknown CSV field {field!r}; use {', '.join(CSV_FIELDS)}")


def detect_format(path: Path) -> str:
    """'jsonl' | 'json' | 'csv' | 'txt' | 'dicom' | 'image', or '' when unsupported."""
    fmt = _EXTENSIONS.get(path.suffix.lower(), "")
    if fmt:
        return fmt
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return ""
    # DICOM Part 10 files often have no extension (DICOMDIR trees use 8-character names).
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    return ""


def parse_csv_columns(spec: str) -> tuple[tuple[str, str], ...]:
    """`prompt=Frage,completion=Antwort` -> (("prompt", "Frage"), ("completion", "Antwort"))."""
    pairs = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        field, sep, column = part.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise ValueError(f"{part!r} is not FIELD=COLUMN")
        pairs.append((field.strip().lower(), column.strip()))
    return tuple(pairs)


def iter_text_records(path: Path, fmt: str, options: ParseOptions) -> Iterator[TextRecord | RecordProblem]:
    """Parse one file. Raises `FileRejected` when nothing in it can be read."""
    check_encoding(path, options.encoding)
    if fmt == "jsonl":
        yield from _iter_jsonl(path, options)
    elif fmt == "json":
        yield from _iter_json(path, options)
    elif fmt == "csv":
        yield from _iter_csv(path, options)
    elif fmt == "txt":
        yield from _iter_txt(path, options)
    else:
        raise FileRejected(f"not a text format ({fmt or 'unknown'})")


def check_encoding(path: Path, encoding: str) -> None:
    """Decode the whole file in 1 MiB chunks; reject it at the first byte that does not decode."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    offset, line = 0, 1
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(MiB):
                # exc.start counts from the bytes of a character split over the previous chunk.
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    at = max(exc.start - pending, 0)
                    bad = chunk[at:at + 1].hex()
                    line += chunk.count(b"\n", 0, at)
                    raise FileRejected(
                        f"not valid {encoding} at line {line} (byte 0x{bad} at offset {offset + at}); "
                        f"save it as UTF-8, or re-run with --encoding gbk / latin-1 if that is what it is"
                    ) from None
                offset += len(chunk)
                line += chunk.count(b"\n")
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise FileRejected(f"not valid {encoding}: the file ends in the middle of a character; "
                           "save it as UTF-8 or pass the right --encoding") from None
    except OSError as exc:
        raise FileRejected(f"cannot read ({(exc.strerror or type(exc).__name__).lower()})") from None


def _iter_lines(path: Path, cap: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) with the newline stripped; None for a line longer than `cap` bytes."""
    with path.open("rb") as fh:
        number = 0
        while True:
            line = fh.readline(cap + 1)
            if not line:
                return
            number += 1
            if len(line) > cap and not line.endswith(b"\n"):
                # Skip the rest of the oversized line in bounded chunks.
                while (rest := fh.readline(MiB)) and not rest.endswith(b"\n"):
                    pass
                yield number, None
                continue
            yield number, line.rstrip(b"\r\n")


def _size_text(limit: int) -> str:
    return f"{limit // MiB} MiB" if limit >= MiB and limit % MiB == 0 else f"{limit} bytes"


def _too_long(where: str, options: ParseOptions) -> RecordProblem:
    return RecordProblem(where, f"longer than the {_size_text(options.max_record_bytes)} record limit; "
                                "split it, or raise --max-record-mb")


def _decode(raw: bytes, encoding: str, first: bool) -> str:
    text = raw.decode(encoding)
    return text.removeprefix("\ufeff") if first else text


def _iter_jsonl(path: Path, options: ParseOptions) -> Iterator[TextRecord | RecordProblem]:
    for number, raw in _iter_lines(path, options.max_record_bytes):
        where = f"line {number}"
        if raw is None:
            yield _too_long(where, options)
            continue
        text = _decode(raw, options.encoding, number == 1).strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield RecordProblem(where, f"invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        except RecursionError:
            yield RecordProblem(where, "invalid JSON (nested too deeply)")
            continue
        yield record_from_object(obj, where)


def _iter_json(path: Path, options: ParseOptions) -> Iterator[TextRecord | RecordProblem]:
    size = path.stat().st_size
    if size > options.max_json_file_bytes:
        raise FileRejected(f"a .json file larger than {_size_text(options.max_json_file_bytes)} is too big to load "
                           "whole; convert it to JSONL (one record per line)")
    raw = path.read_bytes()
    try:
        obj = json.loads(_decode(raw, options.encoding, True))
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # Many exports name JSON Lines files `.json`.
            yield from _iter_jsonl(path, options)
            return
        raise FileRejected(f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise FileRejected("invalid JSON (nested too deeply)") from None
    del raw
    if isinstance(obj, list):
        for index, item in enumerate(obj, start=1):
            yield record_from_object(item, f"item {index}")
    elif isinstance(obj, dict) and isinstance(obj.get("data"), list) and not _shapes(obj):
        for index, item in enumerate(obj["data"], start=1):
            yield record_from_object(item, f"data item {index}")
    else:
        yield record_from_object(obj, "record 1")


def _shapes(obj: dict) -> list[str]:
    found = []
    if "messages" in obj:
        found.append("messages")
    if "conversations" in obj:
        found.append("sharegpt")
    if "instruction" in obj and "output" in obj:
        found.append("alpaca")
    if "prompt" in obj and "completion" in obj:
        found.append("prompt_completion")
    if "text" in obj:
        found.append("text")
    return found


def record_from_object(obj: object, where: str) -> TextRecord | RecordProblem:
    """Recognise the record's shape; an object matching two shapes is ambiguous and refused."""
    if not isinstance(obj, dict):
        return RecordProblem(where, f"not a JSON object; {_SHAPES_HINT}")
    shapes = _shapes(obj)
    if not shapes:
        return RecordProblem(where, f"no known fields; {_SHAPES_HINT}")
    if len(shapes) > 1:
        return RecordProblem(where, f"ambiguous: the record has the fields of {' and '.join(shapes)}; keep one")
    shape = shapes[0]
    try:
        if shape == "messages":
            messages = _openai_messages(obj["messages"])
        elif shape == "sharegpt":
            messages = _sharegpt(obj["conversations"])
        elif shape == "alpaca":
            prompt = _string(obj["instruction"], "instruction")
            extra = _string(obj.get("input") or "", "input")
            messages = (("user", f"{prompt}\n\n{extra}" if extra.strip() else prompt),
                        ("assistant", _string(obj["output"], "output")))
        elif shape == "prompt_completion":
            messages = (("user", _string(obj["prompt"], "prompt")),
                        ("assistant", _string(obj["completion"], "completion")))
        else:
            messages = (("text", _string(obj["text"], "text")),)
    except ValueError as exc:
        return RecordProblem(where, f"{shape}: {exc}")
    if shape in ("messages", "sharegpt") and not any(role == "assistant" for role, _ in messages):
        # Training learns from assistant turns and refuses a conversation without one; say so now.
        return RecordProblem(where, f"{shape}: the conversation has no assistant turn")
    if "system" in obj and shape in ("alpaca", "prompt_completion"):
        try:
            messages = (("system", _string(obj["system"], "system")), *messages)
        except ValueError as exc:
            return RecordProblem(where, f"{shape}: {exc}")
    return TextRecord(where, shape, messages)


def _string(value: object, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"field {field!r} is {_JSON_TYPES.get(type(value), type(value).__name__)}, not text")


def _openai_messages(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for index, message in enumerate(value, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {index} needs 'role' and 'content'")
        role = message["role"]
        if role not in _ROLES:
            raise ValueError(f"message {index} has an unknown role; use system, user, assistant or tool")
        content = message["content"]
        if isinstance(content, list):
            # Multi-part content: keep the text parts (images are not text training data).
            content = "\n".join(_string(p.get("text", ""), f"messages[{index}].content.text")
                                for p in content if isinstance(p, dict) and p.get("type") == "text")
        out.append(("system" if role == "developer" else role, _string(content, f"messages[{index}].content")))
    return tuple(out)


def _sharegpt(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("'conversations' must be a non-empty list")
    out = []
    for index, turn in enumerate(value, start=1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {index} needs 'from' and 'value'")
        role = _SHARE_GPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise ValueError(f"turn {index} has an unknown 'from'; use human, gpt or system")
        out.append((role, _string(turn["value"], f"conversations[{index}].value")))
    return tuple(out)


def _iter_csv(path: Path, options: ParseOptions) -> Iterator[TextRecord | RecordProblem]:
    csv.field_size_limit(options.max_record_bytes)
    with path.open("r", encoding=options.encoding, newline="") as fh:
        sample = fh.read(64 * 1024)
        fh.seek(0)
        if sample.startswith("\ufeff"):
            fh.read(1)
        delimiter = "\t" if path.suffix.lower() == ".tsv" else _sniff_delimiter(sample)
        # csv.reader would read a 200 MB line whole before its field limit fires; feed it capped lines.
        too_long: list[int] = []
        reader = csv.reader(_capped_lines(fh, options.max_record_bytes, too_long), delimiter=delimiter)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise FileRejected(f"not a readable CSV header ({exc})") from None
        if too_long:
            raise FileRejected(f"the header row is longer than the {_size_text(options.max_record_bytes)} "
                               "record limit; is this a CSV file?")
        if not header:
            raise FileRejected("the CSV has no header row")
        mapping = _csv_mapping(header, options)
        row_number = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                # The csv module cannot resynchronise after a broken row; stop here, name the row.
                yield RecordProblem(f"row {row_number + 1}", f"unreadable CSV ({exc}); rows after it were not read")
                return
            row_number += 1
            if too_long:
                too_long.clear()
                yield _too_long(f"row {row_number}", options)
                continue
            if not any(cell.strip() for cell in row):
                continue
            yield _csv_record(row, header, mapping, f"row {row_number}")


def _capped_lines(fh: TextIO, cap: int, too_long: list[int]) -> Iterator[str]:
    """The lines of `fh`; a line over `cap` characters is skipped in bounded reads, its number
    appended to `too_long`, and an empty line given to the csv reader in its place."""
    number = 0
    while line := fh.readline(cap + 1):
        number += 1
        if len(line) > cap and not line.endswith(("\n", "\r")):
            while (rest := fh.readline(MiB)) and not rest.endswith(("\n", "\r")):
                pass
            too_long.append(number)
            yield "\n"
            continue
        yield line


def _sniff_delimiter(sample: str) -> str:
    try:
        return csv.Sniffer().sniff(sample.split("\n", 20)[0] if sample else ",", delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def _csv_mapping(header: list[str], options: ParseOptions) -> dict[str, int]:
    """Field name -> column index. Refuses a header that maps to no known record shape."""
    lowered = [h.strip().lower() for h in header]
    if options.csv_columns:
        # The expected names come from the operator's --columns and are safe to repeat; the
        # header's own names are not (see below), so only their number is given.
        missing = [column for _field, column in options.csv_columns if column.lower() not in lowered]
        if missing:
            raise FileRejected(f"--columns expects the column(s) {', '.join(repr(c) for c in missing)}, which the "
                               f"header row ({len(header)} columns) does not have; check the names and the delimiter")
        mapping = {field: lowered.index(column.lower()) for field, column in options.csv_columns}
        if not ({"instruction", "output"} <= mapping.keys() or {"prompt", "completion"} <= mapping.keys()
                or "text" in mapping):
            raise FileRejected("--columns must map instruction+output, prompt+completion or text, "
                               "e.g. prompt=COL,completion=COL")
    else:
        mapping = {}
        for candidate in _CSV_AUTO:
            if all(col in lowered for col in candidate.values() if col != "input"):
                mapping = {f: lowered.index(c) for f, c in candidate.items() if c in lowered}
                break
        if "system" in lowered and mapping:
            mapping["system"] = lowered.index("system")
    if not ({"instruction", "output"} <= mapping.keys() or {"prompt", "completion"} <= mapping.keys()
            or "text" in mapping):
        # The column names are not echoed: a CSV without a header row has patient data in row 1.
        raise FileRejected(f"the header row ({len(header)} columns) names none of: instruction+output, "
                           "prompt+completion, question+answer, text; pass --columns prompt=COL,completion=COL")
    return mapping


def _csv_record(row: list[str], header: list[str], mapping: dict[str, int], where: str) -> TextRecord | RecordProblem:
    if len(row) < len(header) and any(index >= len(row) for index in mapping.values()):
        return RecordProblem(where, f"has {len(row)} fields, the header has {len(header)}; a column is missing")
    obj = {field: row[index] for field, index in mapping.items()}
    return record_from_object(obj, where)


def _iter_txt(path: Path, options: ParseOptions) -> Iterator[TextRecord | RecordProblem]:
    if options.txt_split == "file":
        if path.stat().st_size > options.max_record_bytes:
            raise FileRejected(f"larger than the {_size_text(options.max_record_bytes)} document limit; "
                               "use --txt-split blocks, or raise --max-record-mb")
        text = path.read_text(encoding=options.encoding).removeprefix("\ufeff")
        yield TextRecord("file", "text", (("text", text),))
        return
    block: list[str] = []
    size, start, count = 0, 0, 0
    oversized = False
    for number, raw in _iter_lines(path, options.max_record_bytes):
        line = None if raw is None else _decode(raw, options.encoding, number == 1)
        if line is not None and not line.strip():
            if block or oversized:
                count += 1
                yield (_too_long(f"block {count} (line {start})", options) if oversized
                       else TextRecord(f"block {count} (line {start})", "text", (("text", "\n".join(block)),)))
            block, size, oversized = [], 0, False
            continue
        if not block and not oversized:
            start = number
        size += len(raw) if raw is not None else options.max_record_bytes + 1
        if line is None or size > options.max_record_bytes:
            oversized, block = True, []
        elif not oversized:
            block.append(line)
    if block or oversized:
        count += 1
        yield (_too_long(f"block {count} (line {start})", options) if oversized
               else TextRecord(f"block {count} (line {start})", "text", (("text", "\n".join(block)),)))

