"""Datasets in the vault: import all-or-nothing, read back, export, crypto-shred, recover.

    <vault object ds-NAME-xxxx>/<job id>-00000 ... <job id>-NNNNN   shards: records, length-prefixed
    <vault object ds-NAME-xxxx>/<job id>-report                    the per-file report (file names)

One vault object (one DEK) per dataset, so deleting a dataset shreds all its versions at once.
An import writes its shards under its job id first; they become a version only when the version
row and every record row commit in one catalog transaction. Shards whose prefix no committed
version names are leftovers of an import that died: `recover_imports` removes them, and a
dataset created by such an import, the next time any `airlock data` command runs. A per-dataset
lock file (flock, released by the kernel when a process dies) tells a running import apart from
a dead one, and keeps two imports into one dataset from interleaving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import secrets
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.audit import append_audit, current_actor
from appliance.catalog import transaction
from appliance.data import datasets
from appliance.data.datasets import Dataset, DatasetVersion, RecordRow
from appliance.data.dedup import NearDupIndex, signature_from_bytes
from appliance.data.errors import DataError
from appliance.data.pipeline import AcceptedRecord, ImportOptions, KnownRecords, Progress, plan_inputs, run_import
from appliance.data.report import ImportReport
from appliance.data.splits import SplitSpec, dataset_split_seed

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.vault.keys import KeyOps

SHARD_TARGET_BYTES = 4 * 1024 * 1024
SHARD_MAX_RECORDS = 20_000
_FRAME = struct.Struct(">I")
REPORT_SUFFIX = "-report"


class ImportCancelled(DataError):
    """The operator cancelled the import; nothing of it was kept."""


@dataclass(frozen=True)
class ImportResult:
    dataset: str
    version: int | None
    """None when nothing was committed (a new dataset whose files were all rejected)."""
    report: ImportReport
    created: bool


@dataclass(frozen=True)
class StoredRecord:
    content_hash: str
    version: int
    split: str
    label: str | None
    group_key: str
    payload: bytes

    def json(self) -> dict[str, Any]:
        """A text record as training reads it: {"messages": [...]} or {"text": ...}."""
        return json.loads(self.payload)


# --- locking and recovery ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def dataset_lock(home: Path, name: str, *, wait: bool = False) -> Iterator[bool]:
    """Hold the dataset's import lock. Yields False (without holding it) when someone else has it."""
    folder = home / "locks"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(folder / f"dataset-{name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def recover_imports(db: sqlite_utils.Database, home: Path) -> list[str]:
    """Remove what dead imports left behind; finish interrupted deletions. Returns what was done."""
    from appliance.vault import records as vault_records
    from appliance.vault.errors import ObjectError
    from appliance.vault.store import SUFFIX, TEMP_MARKER, delete_object, list_files, objects_dir

    done: list[str] = []
    for ds in datasets.all_datasets(db, states=("importing", "active", "deleted")):
        if ds.state == "deleted":
            # A deletion that crashed between the catalog commit and the shredding.
            with contextlib.suppress(ObjectError):
                if vault_records.dek(db, ds.id).state == "active":
                    delete_object(db, home, ds.id)
                    done.append(f"shredded the key of deleted dataset {ds.name}")
            if _shred_derived(db, home, ds.id):
                done.append(f"shredded the caches of deleted dataset {ds.name}")
            continue
        with dataset_lock(home, ds.name) as free:
            if not free:
                continue  # an import into it is running
            if ds.state == "importing":
                with transaction(db):
                    datasets.set_state(db, ds.id, "deleted")
                    append_audit(db, "data.import_recovered", ds.name,
                                 {"dataset_id": ds.id, "action": "removed a dataset whose first import died"})
                with contextlib.suppress(ObjectError):
                    delete_object(db, home, ds.id)
                done.append(f"removed the unfinished new dataset {ds.name}")
                continue
            committed = datasets.shard_prefixes(db, ds.id)
            folder = objects_dir(home) / ds.id
            orphans = [name for name in list_files(home, ds.id) if _prefix(name) not in committed]
            temps = [p for p in folder.iterdir() if TEMP_MARKER in p.name] if folder.is_dir() else []
            for name in orphans:
                (folder / (name + SUFFIX)).unlink(missing_ok=True)
            for path in temps:
                path.unlink(missing_ok=True)
            if orphans or temps:
                with transaction(db):
                    append_audit(db, "data.import_recovered", ds.name,
                                 {"dataset_id": ds.id, "orphan_files_removed": len(orphans) + len(temps)})
                done.append(f"removed {len(orphans) + len(temps)} files of an unfinished import into {ds.name}")
    return done


def _prefix(file_name: str) -> str:
    """The job id a dataset file was written by: `<job id>-00042` or `<job id>-report`."""
    if file_name.endswith(REPORT_SUFFIX):
        return file_name.removesuffix(REPORT_SUFFIX)
    return file_name.rsplit("-", 1)[0]


# --- import --------------------------------------------------------------------------------------------------------

class _ShardWriter:
    """Buffers accepted records and encrypts them into ~4 MiB shards through the vault."""

    def __init__(self, write: Callable[[str, bytes], None], prefix: str, version: int) -> None:
        self.write, self.prefix, self.version = write, prefix, version
        self.rows: list[RecordRow] = []
        self.shards = 0
        self._buffer: list[bytes] = []
        self._size = 0

    def add(self, record: AcceptedRecord) -> None:
        self.rows.append(RecordRow(record.content_hash, self.version, record.split, self.shards,
                                   len(self._buffer), record.group_key, record.label, record.minhash or None))
        self._buffer.append(_FRAME.pack(len(record.payload)) + record.payload)
        self._size += len(record.payload) + _FRAME.size
        if self._size >= SHARD_TARGET_BYTES or len(self._buffer) >= SHARD_MAX_RECORDS:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        self.write(shard_name(self.prefix, self.shards), b"".join(self._buffer))
        self.shards += 1
        self._buffer, self._size = [], 0


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:05d}"


def import_dataset(db: sqlite_utils.Database, home: Path, keys: KeyOps, root: Path, name: str,
                   options: ImportOptions, *, job_id: str, actor: str | None = None,
                   progress: Callable[[Progress], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> ImportResult:
    """Import `root` as a new version of dataset `name` (created if missing), all or nothing."""
    from appliance.data.site_secret import site_secret
    from appliance.vault.store import create_object, delete_object, write_bytes

    datasets.check_name(name)
    actor = actor or current_actor()
    with dataset_lock(home, name) as free:
        if not free:
            raise DataError(f"another import into dataset {name!r} is running",
                            hint="wait for it to finish (`airlock jobs list`), then import again")
        plan = plan_inputs(Path(root), options.fmt)
        kind = plan[2]
        existing = datasets.find(db, name, include_importing=True)
        if existing is not None and existing.state == "importing":
            raise DataError(f"dataset {name!r} is left over from an import that died",
                            hint="run `airlock data list` once (it cleans up), then import again")
        if existing is not None:
            _check_compatible(existing, kind, options)
        secret = site_secret(db, keys, home)
        created = existing is None
        if existing is None:
            existing = Dataset(f"ds-{name}-{secrets.token_hex(4)}", name, kind, options.profile,
                               dataset_split_seed(secret, name), options.splits.to_text(), "importing",
                               datasets.now(), actor)
            with transaction(db):
                create_object(db, keys, existing.id, "dataset")
                datasets.insert(db, existing)
                append_audit(db, "data.create", name, {"dataset_id": existing.id, "kind": kind,
                                                       "profile": options.profile, "splits": existing.split_spec},
                             actor=actor)
        ds = existing
        known = _known_records(db, ds, options)
        last = datasets.versions(db, ds.id)
        version = (last[-1].version if last else 0) + 1
        written: list[str] = []

        def write(file_name: str, data: bytes) -> None:
            written.append(file_name)
            write_bytes(db, keys, home, ds.id, file_name, data)

        _remove_files_with_prefix(home, ds.id, job_id)  # an earlier attempt of this same job
        writer = _ShardWriter(write, job_id, version)

        def on_progress(p: Progress) -> None:
            if should_stop is not None and should_stop():
                raise ImportCancelled(f"import into {name!r} cancelled after {p.files_done} of {p.files_total} files",
                                      hint="nothing of it was kept; start it again when ready")
            if progress is not None:
                progress(p)

        try:
            report = run_import(Path(root), options, secret=secret, split_seed=ds.split_seed, known=known,
                                sink=writer.add, progress=on_progress, plan=plan)
            writer.flush()
            rows = [dataclasses.replace(row, split=report.group_splits[row.group_key or row.content_hash])
                    for row in writer.rows]
            if created and report.records_imported == 0:
                raise DataError(_nothing_imported(name, report),
                                hint="see each file's reason with `airlock data import PATH --name NAME --dry-run`")
            write(job_id + REPORT_SUFFIX, json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8"))
            summary = report.summary()
            entry = DatasetVersion(version, job_id, job_id, datasets.now(), actor, report.records_imported,
                                   writer.shards, _version_hash(rows), summary)
            with transaction(db):
                datasets.insert_version(db, ds.id, entry)
                datasets.insert_records(db, ds.id, rows)
                if created:
                    datasets.set_state(db, ds.id, "active")
                details = {"dataset_id": ds.id, "version": version, "job": job_id, "records_added":
                           report.records_imported, "files_read": summary["files_read"],
                           "buckets": summary["buckets"], "splits": summary["splits"],
                           "content_hash": entry.content_hash}
                if options.accept_burned_in:
                    details["accept_burned_in"] = True
                    details["burned_in_accepted"] = report.changes.get("burned_in_accepted", 0)
                append_audit(db, "data.import", name, details, actor=actor)
        except BaseException:
            _discard(home, ds.id, written)
            if created:
                with contextlib.suppress(Exception), transaction(db):
                    datasets.set_state(db, ds.id, "deleted")
                    append_audit(db, "data.import_failed", name, {"dataset_id": ds.id, "job": job_id}, actor=actor)
                with contextlib.suppress(Exception):
                    delete_object(db, home, ds.id)
            raise
        return ImportResult(name, version, report, created)


def dry_run(db: sqlite_utils.Database, root: Path, name: str, options: ImportOptions,
            progress: Callable[[Progress], None] | None = None) -> ImportReport:
    """What an import would do, storing nothing; works with a locked vault.

    DICOM UIDs are remapped under a throwaway secret here: the report is the same, the values are not
    (and are never shown)."""
    datasets.check_name(name)
    existing = datasets.find(db, name)
    plan = plan_inputs(Path(root), options.fmt)
    if existing is not None:
        _check_compatible(existing, plan[2], options)
        known, seed = _known_records(db, existing, options), existing.split_seed
    else:
        known, seed = KnownRecords(), secrets.token_hex(16)
    return run_import(Path(root), options, secret=secrets.token_bytes(32), split_seed=seed, known=known,
                      progress=progress, plan=plan)


def _check_compatible(ds: Dataset, kind: str, options: ImportOptions) -> None:
    if ds.kind != kind:
        raise DataError(f"dataset {ds.name!r} holds {ds.kind} data; this import is {kind}",
                        hint="import it under a new --name, or pass --format to pick the right files")
    if ds.profile != options.profile:
        raise DataError(f"dataset {ds.name!r} was created with --profile {ds.profile}, not {options.profile}",
                        hint=f"append with --profile {ds.profile}, or import under a new --name")
    if options.splits.to_text() != ds.split_spec:
        raise DataError(f"dataset {ds.name!r} splits records {ds.split_spec}; --split {options.splits.to_text()} "
                        "would move old records", hint="leave out --split when appending to a dataset")


def _known_records(db: sqlite_utils.Database, ds: Dataset, options: ImportOptions) -> KnownRecords:
    known = KnownRecords()
    if options.near_dup_threshold is not None and ds.kind == "text":
        known.near = NearDupIndex(options.near_dup_threshold)
    for row in datasets.records(db, ds.id):
        known.hashes.add(row.content_hash)
        known.groups[row.group_key or row.content_hash] = row.split
        if known.near is not None and row.minhash:
            known.near.add(row.content_hash, signature_from_bytes(row.minhash))
    return known


def _version_hash(rows: list[RecordRow]) -> str:
    """Identity of a version's content: SHA-256 over its sorted record hashes (lineage cites this)."""
    digest = hashlib.sha256(b"airlock-dataset-version/v1\0")
    for content_hash in sorted(r.content_hash for r in rows):
        digest.update(bytes.fromhex(content_hash))
    return digest.hexdigest()


def _nothing_imported(name: str, report: ImportReport) -> str:
    counts = ", ".join(f"{n} {b}" for b, n in report.buckets.items() if n)
    return f"nothing to import into new dataset {name!r}: {len(report.files)} files read ({counts or 'none'})"


def _discard(home: Path, object_id: str, names: list[str]) -> None:
    from appliance.vault.store import file_path

    for name in names:
        with contextlib.suppress(OSError):
            file_path(home, object_id, name).unlink(missing_ok=True)


def _remove_files_with_prefix(home: Path, object_id: str, prefix: str) -> None:
    from appliance.vault.store import list_files

    _discard(home, object_id, [n for n in list_files(home, object_id) if _prefix(n) == prefix])


# --- reading -------------------------------------------------------------------------------------------------------

def iter_records(db: sqlite_utils.Database, keys: KeyOps, home: Path, ds: Dataset, *, split: str | None = None,
                 max_version: int | None = None, min_version: int | None = None) -> Iterator[StoredRecord]:
    """Decrypt the dataset's records in storage order, one shard in memory at a time."""
    from appliance.vault.store import read_bytes

    prefixes = {v.version: v.shard_prefix for v in datasets.versions(db, ds.id)}
    current: tuple[int, int] | None = None
    frames: list[bytes] = []
    for row in list(datasets.records(db, ds.id, split=split, max_version=max_version, min_version=min_version)):
        if (row.version, row.shard) != current:
            current = (row.version, row.shard)
            frames = _frames(read_bytes(db, keys, home, ds.id, shard_name(prefixes[row.version], row.shard)))
        if row.position >= len(frames):
            raise DataError(f"dataset {ds.name!r}: shard {row.shard} of version {row.version} has fewer records than "
                            "the catalog says", hint="run `airlock vault verify`; restore the dataset from a backup")
        yield StoredRecord(row.content_hash, row.version, row.split, row.label, row.group_key, frames[row.position])


def _frames(data: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset < len(data):
        (length,) = _FRAME.unpack_from(data, offset)
        offset += _FRAME.size
        out.append(data[offset:offset + length])
        offset += length
    return out


def load_report(db: sqlite_utils.Database, keys: KeyOps, home: Path, ds: Dataset, version: int | None = None
                ) -> tuple[DatasetVersion, dict[str, Any]]:
    """The per-file report of one version (default: the latest), decrypted."""
    from appliance.vault.store import read_bytes

    found = datasets.versions(db, ds.id)
    if version is not None:
        found = [v for v in found if v.version == version]
    if not found:
        raise DataError(f"dataset {ds.name!r} has no version {version}",
                        hint=f"see its versions with `airlock data show {ds.name}`")
    entry = found[-1]
    return entry, json.loads(read_bytes(db, keys, home, ds.id, entry.shard_prefix + REPORT_SUFFIX))


# --- delete and export ---------------------------------------------------------------------------------------------

def delete_dataset(db: sqlite_utils.Database, home: Path, name: str, *, actor: str | None = None) -> int:
    """Crypto-shred a dataset: catalog rows go, then its data key, then its files. Needs no key."""
    from appliance.vault.store import delete_object

    ds = datasets.get(db, name)
    with dataset_lock(home, name) as free:
        if not free:
            raise DataError(f"an import into dataset {name!r} is running",
                            hint="cancel it first (`airlock jobs cancel`)")
        with transaction(db):
            count = db.execute("SELECT COUNT(*) FROM dataset_records WHERE dataset_id = ?", [ds.id]).fetchone()[0]
            datasets.delete_records(db, ds.id)
            datasets.set_state(db, ds.id, "deleted")
            append_audit(db, "data.delete", name, {"dataset_id": ds.id, "records": count}, actor=actor)
        delete_object(db, home, ds.id)
        _shred_derived(db, home, ds.id)
    return count


def _shred_derived(db: sqlite_utils.Database, home: Path, dataset_id: str) -> list[str]:
    """Crypto-shred what was derived from a dataset's records (tokenized caches: `tok-<dataset id>-...`)."""
    from appliance.vault.store import delete_object

    rows = db.execute("SELECT object_id FROM vault_deks WHERE state = 'active' AND object_id LIKE ? ESCAPE '\\'",
                      [f"tok-{dataset_id}-%".replace("_", "\\_")]).fetchall()
    for (object_id,) in rows:
        delete_object(db, home, object_id)
    return [r[0] for r in rows]


def export_dataset(db: sqlite_utils.Database, keys: KeyOps, home: Path, name: str, out: Path, *,
                   split: str | None = None, actor: str | None = None) -> dict[str, int]:
    """Write the stored (de-identified) records out for review: JSONL per split, or DICOM/PNG per split and label.

    Plaintext leaves the vault here on purpose; the export is audited with its destination."""
    ds = datasets.get(db, name)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"export folder {out} is not empty", hint="choose a new or empty folder")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    handles: dict[str, Any] = {}
    try:
        for record in iter_records(db, keys, home, ds, split=split):
            counts[record.split] = counts.get(record.split, 0) + 1
            if ds.kind == "text":
                if record.split not in handles:
                    handles[record.split] = open(out / f"{record.split}.jsonl", "wb")
                handles[record.split].write(record.payload)
            else:
                from appliance.data.images import export_image_record

                folder = out / record.split / _safe_label(record.label)
                folder.mkdir(parents=True, exist_ok=True)
                export_image_record(record.payload, folder, record.content_hash[:20])
    finally:
        for handle in handles.values():
            handle.close()
    with transaction(db):
        append_audit(db, "data.export", name, {"dataset_id": ds.id, "out": str(out.resolve()), "records": counts,
                                               "split": split or "all"}, actor=actor)
    return counts


def _safe_label(label: str | None) -> str:
    if not label:
        return "unlabeled"
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in label).strip("._")
    return cleaned[:64] or "unlabeled"


def splits_of(ds: Dataset) -> SplitSpec:
    return SplitSpec.parse(ds.split_spec)
