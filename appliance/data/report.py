"""What happened to every input file: one bucket per file, counts that add up.

Buckets: imported, duplicate, cleaned-empty, quarantined, rejected. A file lands in
"imported" when at least one of its records was imported; its other records are counted
(duplicates, cleaned-empty, rejected) and the first problems listed by line/row number.
`ImportReport.check()` asserts the invariant that bucket counts add up to the files read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

BUCKETS = ("imported", "duplicate", "cleaned-empty", "quarantined", "rejected")
MAX_ISSUES_PER_FILE = 20


@dataclass(frozen=True)
class RecordIssue:
    """A record that was not imported: where (line/row/item) and why (no contents)."""

    where: str
    reason: str


@dataclass(frozen=True)
class FileOutcome:
    """One input file's fate. `rel` is the path relative to the import root (may be PHI:
    it is shown to the operator and kept only inside the encrypted store, never in the catalog)."""

    file_no: int
    rel: str
    size: int
    fmt: str
    bucket: str
    reason: str = ""
    records_read: int = 0
    imported: int = 0
    duplicates: int = 0
    cleaned_empty: int = 0
    rejected: int = 0
    issues: tuple[RecordIssue, ...] = ()

    def __post_init__(self) -> None:
        if self.bucket not in BUCKETS:
            raise ValueError(f"unknown bucket {self.bucket!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FileTally:
    """Accumulates one file's record outcomes while it is parsed."""

    records_read: int = 0
    imported: int = 0
    duplicates: int = 0
    cleaned_empty: int = 0
    rejected: int = 0
    issues: list[RecordIssue] = field(default_factory=list)

    def issue(self, where: str, reason: str) -> None:
        if len(self.issues) < MAX_ISSUES_PER_FILE:
            self.issues.append(RecordIssue(where, reason))

    def outcome(self, file_no: int, rel: str, size: int, fmt: str) -> FileOutcome:
        """Decide the file's bucket from its records: imported if any record was; otherwise the
        most common fate (ties: duplicate, cleaned-empty, rejected), and the reason names each
        fate that occurred, so that 99 invalid lines are not reported as "empty after cleaning"."""
        fates = {"duplicate": self.duplicates, "cleaned-empty": self.cleaned_empty, "rejected": self.rejected}
        if self.imported:
            bucket, reason = "imported", ""
        elif not any(fates.values()):
            bucket, reason = "cleaned-empty", "no records in the file (only blank lines)"
        else:
            bucket = max(fates, key=lambda b: fates[b])
            first = self.issues[0] if self.issues else RecordIssue("?", "invalid")
            phrases = {
                "duplicate": f"{self.duplicates} already in this dataset or earlier in this import",
                "cleaned-empty": f"{self.cleaned_empty} empty after cleaning (or shorter than --min-chars)",
                "rejected": f"{self.rejected} rejected (first: {first.where}: {first.reason})",
            }
            reason = "no record imported: " + "; ".join(phrases[b] for b in sorted(fates, key=lambda b: b != bucket)
                                                         if fates[b])
        return FileOutcome(file_no, rel, size, fmt, bucket, reason, self.records_read, self.imported,
                           self.duplicates, self.cleaned_empty, self.rejected, tuple(self.issues))


@dataclass(frozen=True)
class ImportReport:
    """The whole import: every file's outcome plus cleaning, PII and split counts."""

    files: tuple[FileOutcome, ...]
    changes: dict[str, int]
    splits: dict[str, int]
    kind: str
    group_splits: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    """The split of each imported group (pseudonym or content hash): used to store the records,
    never written to a report, the catalog's version summary or the audit log."""

    @property
    def buckets(self) -> dict[str, int]:
        counts = Counter(f.bucket for f in self.files)
        return {b: counts.get(b, 0) for b in BUCKETS}

    @property
    def records_imported(self) -> int:
        return sum(f.imported for f in self.files)

    def check(self) -> None:
        """The report accounts for every file read, each exactly once, and for every record read.

        A real exception, not `assert` (which `python -O` drops): an import whose report does not
        add up must not be committed."""
        numbers = [f.file_no for f in self.files]
        if numbers != list(range(1, len(numbers) + 1)):
            raise RuntimeError("import report: files are missing or appear twice")
        for f in self.files:
            if f.bucket != "quarantined" and f.records_read and \
                    f.records_read != f.imported + f.duplicates + f.cleaned_empty + f.rejected:
                raise RuntimeError(f"import report: the record counts of file {f.file_no} do not add up")

    def summary(self) -> dict[str, Any]:
        """Counts only (no paths, no contents): safe for the catalog and the audit log."""
        return {"files_read": len(self.files), "buckets": self.buckets,
                "records": {"read": sum(f.records_read for f in self.files), "imported": self.records_imported,
                            "duplicates": sum(f.duplicates for f in self.files),
                            "cleaned_empty": sum(f.cleaned_empty for f in self.files),
                            "rejected": sum(f.rejected for f in self.files)},
                "changes": dict(sorted(self.changes.items())), "splits": dict(self.splits), "kind": self.kind}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "files": [f.to_dict() for f in self.files]}
