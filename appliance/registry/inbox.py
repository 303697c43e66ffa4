"""A schedule's inbox: files dropped into a folder are imported into the task's dataset on the next run.

    <inbox>/new-logs.jsonl      -> imported as a new dataset version, then moved to <inbox>/processed/
    <inbox>/broken.csv          -> nothing importable: moved to <inbox>/rejected/, with broken.csv.reason.txt

Each file is its own import (a `data_import` job run in this process, all or nothing, audited),
so one bad file does not hold back the others. A file is first read as a dry run: one that would
add no record is rejected without creating an empty dataset version. Hidden files and names
ending in .part or .tmp are left alone: copy a file in under such a name and rename it when it
is complete. The schedule's own rows record counts only; each import's job records its path,
as `airlock data import` does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils

PROCESSED, REJECTED = "processed", "rejected"
_SKIP_SUFFIXES = (".part", ".tmp")


@dataclass
class InboxResult:
    files_imported: int = 0
    files_rejected: int = 0
    records_imported: int = 0
    jobs: list[str] = field(default_factory=list)


def waiting_files(inbox: Path) -> list[Path]:
    if not inbox.is_dir():
        return []
    return sorted(p for p in inbox.iterdir() if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
                  and not p.name.endswith(_SKIP_SUFFIXES))


def _move(path: Path, folder: str) -> Path:
    target_dir = path.parent / folder
    target_dir.mkdir(mode=0o700, exist_ok=True)
    target = target_dir / path.name
    if target.exists():
        target = target_dir / f"{path.stem}-{datetime.now(UTC):%Y%m%d%H%M%S%f}{path.suffix}"
    path.rename(target)
    return target


def _reject(path: Path, reason: str) -> None:
    moved = _move(path, REJECTED)
    with contextlib.suppress(OSError):
        (moved.parent / (moved.name + ".reason.txt")).write_text(reason + "\n", encoding="utf-8")


def import_inbox(db: sqlite_utils.Database, inbox: Path, dataset_name: str, *, actor: str) -> InboxResult:
    """Import every waiting file of `inbox` into `dataset_name`; move each to processed/ or rejected/."""
    from appliance.data import datasets
    from appliance.data.errors import DataError
    from appliance.data.import_job import options_to_params
    from appliance.data.pipeline import ImportOptions
    from appliance.data.splits import SplitSpec
    from appliance.data.store import dry_run
    from appliance.errors import AirlockError
    from appliance.jobs.records import create_job, get_job
    from appliance.jobs.runner import run_job

    ds = datasets.get(db, dataset_name)
    options = ImportOptions(profile=ds.profile, splits=SplitSpec.parse(ds.split_spec))
    result = InboxResult()
    for path in waiting_files(inbox):
        try:
            report = dry_run(db, path, dataset_name, options)
        except (AirlockError, OSError) as exc:
            _reject(path, exc.message if isinstance(exc, AirlockError) else f"cannot read the file: {exc.strerror}")
            result.files_rejected += 1
            continue
        if report.records_imported == 0:
            counts = ", ".join(f"{n} {bucket}" for bucket, n in report.buckets.items() if n) or "no records"
            _reject(path, f"nothing to import: {counts} (see `airlock data import FILE --name {dataset_name} "
                          "--dry-run`)")
            result.files_rejected += 1
            continue
        job = create_job(db, "data_import", {"path": str(path.resolve()), "name": dataset_name,
                                             "options": options_to_params(options), "source": "inbox"}, actor=actor)
        result.jobs.append(job.id)
        try:
            run_job(db, job.id)
        except DataError:
            pass  # recorded on the job as failed
        finished = get_job(db, job.id)
        if finished.state == "succeeded":
            _move(path, PROCESSED)
            result.files_imported += 1
            result.records_imported += int((finished.result or {}).get("records_added") or 0)
        else:
            _reject(path, f"{finished.error or 'the import ended ' + finished.state}" +
                    (f" ({finished.hint})" if finished.hint else ""))
            result.files_rejected += 1
    return result
