"""The import run without storage: walk, parse, clean, scrub, dedup, split, report.

`run_import` is what `airlock data import --dry-run` executes, and what the importer executes
with a sink that encrypts accepted records into shards. It reads files one at a time and keeps
only metadata (hashes, signatures, outcomes) in memory, so a folder of 10 000 files or one
200 MB line costs flat memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.data.clean import CleanOptions, clean_record
from appliance.data.dedup import NearDupIndex, minhash_text, record_hash, signature, signature_to_bytes
from appliance.data.errors import DataError, FileRejected
from appliance.data.formats import TEXT_FORMATS, ParseOptions, RecordProblem, detect_format, iter_text_records
from appliance.data.pii import scrub_text
from appliance.data.report import FileOutcome, FileTally, ImportReport
from appliance.data.splits import SplitSpec, assign_split, settle_splits
from appliance.data.walk import SYMLINK_REASON, InputFile, walk_inputs

FORMATS = ("auto", "jsonl", "json", "csv", "txt", "dicom", "images")
PROFILES = ("general", "medical")
KINDS = {"jsonl": "text", "json": "text", "csv": "text", "txt": "text", "dicom": "dicom", "image": "images"}


@dataclass(frozen=True)
class ImportOptions:
    """Everything that shapes one import. Defaults suit a general (non-medical) text dataset."""

    fmt: str = "auto"
    """auto | jsonl | json | csv | txt | dicom | images; auto decides per file from its name and bytes."""
    profile: str = "general"
    """general | medical. medical turns the PII scrub on and adds nothing else silently."""
    parse: ParseOptions = field(default_factory=ParseOptions)
    clean: CleanOptions = field(default_factory=CleanOptions)
    scrub_pii: bool | None = None
    """None: on for the medical profile, off otherwise."""
    near_dup_threshold: float | None = 0.85
    """Estimated Jaccard similarity at which a record is a near duplicate; None turns it off."""
    splits: SplitSpec = field(default_factory=SplitSpec)
    labels: Path | None = None
    """CSV of key,label for images and DICOM (key: file name, SOP/Series/StudyInstanceUID, AccessionNumber or
    PatientID; see appliance/data/labels.py)."""
    accept_burned_in: bool = False
    """Import DICOM images that may carry burned-in text instead of quarantining them (audited)."""
    frames: str = "middle"
    """DICOM multi-frame rule: middle | each | stack:N (appliance/data/dicom_pixels.py, FrameRule)."""
    image_size: int = 224
    """Pixels are resized to image_size x image_size before they are stored as float16."""
    max_image_file_mb: int = 512
    """Largest DICOM/image file read: each is decoded in memory (and DICOM kept whole for review)."""
    retain_patient_characteristics: bool = True
    retain_modified_dates: bool = True
    private_creators_allowed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown format {self.fmt!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}")
        if self.image_size < 8 or self.image_size > 4096:
            raise ValueError("image_size must be between 8 and 4096")
        if self.max_image_file_mb < 1:
            raise ValueError("max_image_file_mb must be at least 1")
        from appliance.data.dicom_pixels import FrameRule

        FrameRule.parse(self.frames)  # ValueError with the accepted forms

    @property
    def pii_enabled(self) -> bool:
        return self.profile == "medical" if self.scrub_pii is None else self.scrub_pii


@dataclass(frozen=True)
class AcceptedRecord:
    """A record that passed every stage, ready to be encrypted. `payload` is the bytes stored."""

    content_hash: str
    split: str
    file_no: int
    kind: str
    payload: bytes
    group_key: str = ""
    label: str | None = None
    minhash: bytes = b""


@dataclass(frozen=True)
class Progress:
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    records_imported: int
    elapsed_s: float

    @property
    def eta_s(self) -> float | None:
        if not self.bytes_done or self.bytes_done >= self.bytes_total:
            return None if self.bytes_done < self.bytes_total else 0.0
        return self.elapsed_s * (self.bytes_total - self.bytes_done) / self.bytes_done


@dataclass
class KnownRecords:
    """What the dataset already holds (earlier versions): content hashes, MinHash signatures, and
    the split of each group (patient pseudonym, or content hash for records without a group)."""

    hashes: set[str] = field(default_factory=set)
    near: NearDupIndex | None = None
    groups: dict[str, str] = field(default_factory=dict)


@dataclass
class ImportContext:
    """Per-run state shared by the per-kind importers.

    Records are accepted per file: `accept` holds them until the file is finished, and only
    `commit_file` hands them to the sink. A file that fails halfway (a USB stick pulled out, a
    parser error) is rejected whole and leaves no records, counts or signatures behind.
    """

    options: ImportOptions
    secret: bytes
    split_seed: str
    known: KnownRecords
    sink: Callable[[AcceptedRecord], None] | None
    changes: Counter[str] = field(default_factory=Counter)
    group_records: Counter[str] = field(default_factory=Counter)
    """Committed records per group, in first-seen order: the splits are settled at the end."""
    seen: set[str] = field(default_factory=set)
    near: NearDupIndex | None = None
    """This run's committed signatures; `known.near` (earlier versions) is only read."""
    labels: dict[str, str] | None = None
    _pending: list[AcceptedRecord] = field(default_factory=list)
    _file_seen: set[str] = field(default_factory=set)
    _file_near: NearDupIndex | None = None
    _changes_before: Counter[str] = field(default_factory=Counter)

    def keyed_hash(self, purpose: str, value: str) -> str:
        """HMAC-SHA256 under the site secret: stable across imports, not reversible without it."""
        return hmac.new(self.secret, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()

    def is_duplicate(self, content_hash: str) -> bool:
        return content_hash in self.seen or content_hash in self._file_seen or content_hash in self.known.hashes

    def near_duplicate(self, sig) -> bool:
        return any(index is not None and index.query(sig) is not None
                   for index in (self.known.near, self.near, self._file_near))

    def add_signature(self, content_hash: str, sig) -> None:
        if self._file_near is not None:
            self._file_near.add(content_hash, sig)

    def accept(self, record: AcceptedRecord) -> None:
        self._file_seen.add(record.content_hash)
        self._pending.append(record)

    def begin_file(self) -> None:
        self._pending, self._file_seen = [], set()
        self._file_near = NearDupIndex(self.near.threshold) if self.near is not None else None
        self._changes_before = Counter(self.changes)

    def commit_file(self) -> None:
        for record in self._pending:
            self.seen.add(record.content_hash)
            self.group_records[record.group_key or record.content_hash] += 1
            if self.sink is not None:
                self.sink(record)
        if self.near is not None and self._file_near is not None:
            self.near.merge(self._file_near)
        self._pending, self._file_seen, self._file_near = [], set(), None

    def abort_file(self) -> None:
        self.changes = self._changes_before
        self._pending, self._file_seen, self._file_near = [], set(), None


def plan_inputs(root: Path, fmt: str) -> tuple[list[InputFile], list[str], str]:
    """The files to read, the format to read each with, and the dataset kind (text/dicom/images)."""
    if not root.exists() and not root.is_symlink():
        raise DataError(f"import path does not exist: {root}", hint="check the path and that the USB stick is mounted")
    inputs = list(walk_inputs(root))
    if fmt == "auto":
        fmts = ["" if f.skip_reason else detect_format(f.path) for f in inputs]
        kinds = {KINDS[f] for f in fmts if f}
        if len(kinds) > 1:
            counts = Counter(KINDS[f] for f in fmts if f)
            raise DataError(
                f"the import path mixes kinds of data ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})",
                hint="import each kind as its own dataset, or pass --format to pick one (other files are rejected)")
        kind = kinds.pop() if kinds else "text"
    else:
        fixed = "image" if fmt == "images" else fmt
        fmts = ["" if f.skip_reason else fixed for f in inputs]
        kind = KINDS[fixed]
    return inputs, fmts, kind


def run_import(root: Path, options: ImportOptions, *, secret: bytes, split_seed: str,
               known: KnownRecords | None = None, sink: Callable[[AcceptedRecord], None] | None = None,
               progress: Callable[[Progress], None] | None = None, plan: tuple | None = None) -> ImportReport:
    """Read every file under `root` and return the report; accepted records go to `sink`."""
    inputs, fmts, kind = plan or plan_inputs(Path(root), options.fmt)
    known = known or KnownRecords()
    ctx = ImportContext(options, secret, split_seed, known, sink)
    if options.near_dup_threshold is not None:
        ctx.near = NearDupIndex(options.near_dup_threshold)
    if options.labels and kind == "text":
        raise DataError("--labels is for DICOM and image imports; this import is text",
                        hint="leave out --labels, or pass --format dicom / images")
    if kind in ("dicom", "images"):
        from appliance.data.labels import load_labels

        ctx.labels = load_labels(options.labels) if options.labels else None
    outcomes: list[FileOutcome] = []
    total_bytes = sum(f.size for f in inputs)
    started, done_bytes, imported = time.monotonic(), 0, 0
    for number, (item, fmt) in enumerate(zip(inputs, fmts, strict=True), start=1):
        ctx.begin_file()
        outcome = _import_one(number, item, fmt, kind, ctx)
        if outcome.bucket == "rejected" and outcome.imported == 0:
            ctx.abort_file()  # e.g. read error after some records: keep none of them
        else:
            ctx.commit_file()
        outcomes.append(outcome)
        imported += outcome.imported
        done_bytes += item.size
        if progress is not None:
            progress(Progress(number, len(inputs), done_bytes, total_bytes, imported, time.monotonic() - started))
    # The sink already has the records with their hashed split; `group_splits` is what they end in
    # (the importer applies it to the rows before it commits them).
    group_splits = settle_splits(ctx.group_records, split_seed, options.splits, known.groups)
    splits: Counter[str] = Counter()
    for group, count in ctx.group_records.items():
        splits[group_splits[group]] += count
    report = ImportReport(tuple(outcomes), dict(ctx.changes), dict(splits), kind, group_splits)
    report.check()
    return report


def _import_one(number: int, item: InputFile, fmt: str, kind: str, ctx: ImportContext) -> FileOutcome:
    if item.skip_reason:
        return FileOutcome(number, item.rel, item.size, "", "rejected", item.skip_reason)
    if not fmt:
        return FileOutcome(number, item.rel, item.size, "", "rejected",
                           f"unsupported file type '{item.path.suffix or '(none)'}'; "
                           f"supported: .jsonl .json .csv .tsv .txt .dcm .png .jpg")
    if item.size == 0:
        return FileOutcome(number, item.rel, 0, fmt, "rejected", "the file is empty")
    if KINDS.get(fmt) != kind:
        return FileOutcome(number, item.rel, item.size, fmt, "rejected", f"not {kind} data (this import is {kind})")
    if kind != "text" and item.size > ctx.options.max_image_file_mb * 1024 * 1024:
        return FileOutcome(number, item.rel, item.size, fmt, "rejected",
                           f"larger than {ctx.options.max_image_file_mb} MiB (e.g. a long cine loop); export "
                           "single frames, or raise --max-image-mb")
    if _replaced_by_a_link(item):
        return FileOutcome(number, item.rel, item.size, fmt, "rejected", SYMLINK_REASON)
    try:
        if fmt in TEXT_FORMATS:
            return _import_text_file(number, item, fmt, ctx)
        if fmt == "dicom":
            from appliance.data.dicom_files import import_dicom_file

            return import_dicom_file(number, item, ctx)
        from appliance.data.images import import_image_file

        return import_image_file(number, item, ctx)
    except FileRejected as exc:
        return FileOutcome(number, item.rel, item.size, fmt, "rejected", exc.reason)
    except (OSError, MemoryError) as exc:
        ctx.abort_file()
        return FileOutcome(number, item.rel, item.size, fmt, "rejected",
                           f"cannot read ({getattr(exc, 'strerror', None) or type(exc).__name__})")
    except Exception as exc:
        # A parser bug or a file that changed while it was read must not stop the whole import.
        # Type and place only: the message may quote the file's contents.
        import traceback

        ctx.abort_file()
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return FileOutcome(number, item.rel, item.size, fmt, "rejected",
                           f"could not be read: internal error ({type(exc).__name__} at "
                           f"{Path(frame.filename).name}:{frame.lineno}); please report it")


def _replaced_by_a_link(item: InputFile) -> bool:
    """The listing saw a regular file; a link put in its place since then is not followed either."""
    try:
        return stat.S_ISLNK(os.lstat(item.path).st_mode)
    except OSError:
        return False  # gone: the reader says so in its own words


def _import_text_file(number: int, item: InputFile, fmt: str, ctx: ImportContext) -> FileOutcome:
    options = ctx.options
    tally = FileTally()
    for parsed in iter_text_records(item.path, fmt, options.parse):
        tally.records_read += 1
        if isinstance(parsed, RecordProblem):
            tally.rejected += 1
            tally.issue(parsed.where, parsed.reason)
            continue
        cleaned = clean_record(parsed, ctx.changes, options.clean)
        if cleaned.record is None:
            if cleaned.dropped == "too_long":
                tally.rejected += 1
                tally.issue(parsed.where, f"longer than --max-chars ({options.clean.max_chars}) after cleaning")
            else:
                tally.cleaned_empty += 1
                ctx.changes[f"dropped_{cleaned.dropped}"] += 1
            continue
        messages = cleaned.record.messages
        if options.pii_enabled:
            messages = tuple((role, scrub_text(content, ctx.changes)) for role, content in messages)
        digest = record_hash(messages)
        if ctx.is_duplicate(digest):
            tally.duplicates += 1
            ctx.changes["duplicate_exact"] += 1
            continue
        sig_bytes = b""
        if ctx.near is not None:
            sig = signature(minhash_text(messages))
            if ctx.near_duplicate(sig):
                tally.duplicates += 1
                ctx.changes["duplicate_near"] += 1
                continue
            ctx.add_signature(digest, sig)
            sig_bytes = signature_to_bytes(sig)
        split = assign_split(digest, ctx.split_seed, options.splits)
        ctx.accept(AcceptedRecord(digest, split, number, "text", _text_payload(messages, parsed.shape),
                                  minhash=sig_bytes))
        tally.imported += 1
    return tally.outcome(number, item.rel, item.size, fmt)


def _text_payload(messages: tuple[tuple[str, str], ...], shape: str) -> bytes:
    """One JSON line as stored (and exported): plain text stays {"text"}, the rest {"messages"}."""
    if len(messages) == 1 and messages[0][0] == "text":
        body: dict = {"text": messages[0][1]}
    else:
        body = {"messages": [{"role": r, "content": c} for r, c in messages]}
    body["source_format"] = shape
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
