"""Encrypted objects: one DEK per object (a dataset, a model artifact), any number of files per object.

    <AIRLOCK_HOME>/vault/objects/<object_id>/<name>.alv     AIRLOCK-STREAM-1 ciphertext

A file's stream object id is "<object_id>/<name>", so a file moved to another object, or renamed
within one, fails authentication. Writes go to a temp file in the same directory (ciphertext
too) and are renamed into place only after the final segment is written and synced: a crash or
a locked vault never leaves a half-written file under its real name. Reads decrypt into memory
(`read_bytes`, or `read_into` a file-like object you choose): plaintext never touches the disk.
Deleting an object destroys its wrapped DEK first (crypto-shredding), then its files.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from appliance.audit import append_audit
from appliance.catalog import transaction
from appliance.vault import records
from appliance.vault.errors import ObjectError, StreamError, VaultError, VaultLockedError
from appliance.vault.keys import KeyOps
from appliance.vault.stream import DEFAULT_SEGMENT_SIZE, decrypt_stream, encrypt_stream

if TYPE_CHECKING:
    import sqlite_utils

SUFFIX = ".alv"
REF_PREFIX = "ref."
"""A file `ref.<object id>` (empty) in an object: that other object needs this one (`live_references`)."""
TEMP_MARKER = ".tmp-"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_KIND = re.compile(r"[a-z][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class FileCheck:
    object_id: str
    name: str
    path: str
    ok: bool
    bytes: int
    error: str


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    files_checked: int
    files_failed: int
    sampled: bool
    files: list[FileCheck]

    def to_dict(self) -> dict:
        return {"ok": self.ok, "files_checked": self.files_checked, "files_failed": self.files_failed,
                "sampled": self.sampled, "files": [asdict(f) for f in self.files]}


def objects_dir(home: Path) -> Path:
    return home / "vault" / "objects"


def file_path(home: Path, object_id: str, name: str) -> Path:
    _check_id(object_id, "object id")
    _check_id(name, "file name")
    return objects_dir(home) / object_id / (name + SUFFIX)


def create_object(db: sqlite_utils.Database, keys: KeyOps, object_id: str, kind: str) -> str:
    """Register an object with a fresh DEK under the active KEK. Returns its DEK id."""
    _check_id(object_id, "object id")
    if not _KIND.fullmatch(kind):
        raise ObjectError(f"object kind {kind!r} is not a lowercase word", hint="use e.g. dataset or model")
    records.require_initialized(db)
    dek_id = secrets.token_hex(16)
    with transaction(db):
        if db.execute("SELECT 1 FROM vault_deks WHERE object_id = ?", [object_id]).fetchone():
            raise ObjectError(f"object {object_id} already exists in the vault (or was deleted: ids are never reused)",
                              hint="choose a new object id")
        kek = records.active_kek(db)
        _, wrapped_dek = keys.new_dek(kek.version, kek.wrapped_kek, object_id)
        records.insert_dek(db, object_id, kind, dek_id, kek.version, wrapped_dek)
        append_audit(db, "vault.object_create", object_id, {"kind": kind, "dek_id": dek_id,
                                                            "kek_version": kek.version})
    return dek_id


def write_file(db: sqlite_utils.Database, keys: KeyOps, home: Path, object_id: str, name: str, src: BinaryIO, *,
               overwrite: bool = False, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Path:
    """Encrypt `src` into the object's file `name`, atomically. Returns the final path."""
    final = file_path(home, object_id, name)
    record, dek = _dek(db, keys, object_id)
    if final.exists() and not overwrite:
        raise ObjectError(f"{final} already exists", hint="write under a new name (objects are immutable)")
    for folder in (home / "vault", objects_dir(home), final.parent):
        folder.mkdir(mode=0o700, exist_ok=True)
    temp = final.with_name(f".{final.name}{TEMP_MARKER}{secrets.token_hex(6)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw:
            out = _Hashing(raw)
            size = encrypt_stream(src, out, dek=dek, dek_id=bytes.fromhex(record.dek_id),  # type: ignore[arg-type]
                                  object_id=f"{object_id}/{name}", segment_size=segment_size)
            raw.flush()
            os.fsync(raw.fileno())
        # The digest is recorded before the file takes its name: a crash in between leaves the old
        # file under a digest it does not match, which reads refuse (fail closed) until rewritten.
        with transaction(db):
            records.record_file(db, object_id, name, out.hexdigest(), out.count)
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_dir(final.parent)
    with transaction(db):
        append_audit(db, "vault.write", object_id, {"file": name, "bytes": size, "sha256": out.hexdigest()})
    return final


def write_bytes(db: sqlite_utils.Database, keys: KeyOps, home: Path, object_id: str, name: str, data: bytes,
                **options) -> Path:
    return write_file(db, keys, home, object_id, name, io.BytesIO(data), **options)


def read_into(db: sqlite_utils.Database, keys: KeyOps, home: Path, object_id: str, name: str,
              dst: BinaryIO) -> int:
    """Decrypt a file into `dst` (keep it in memory). On an error `dst` holds a partial plaintext:
    discard it. Returns the byte count."""
    path = file_path(home, object_id, name)
    record, dek = _dek(db, keys, object_id)
    try:
        src = path.open("rb")
    except FileNotFoundError:
        raise ObjectError(f"{path} does not exist (object {object_id} has no file {name!r})",
                          hint="list the object's files, or restore the file from a backup") from None
    try:
        with src:
            size = _decrypt_checked(db, src, dst, dek, record, object_id, name, path)
    except StreamError:
        # A file that fails authentication is a security event, not just an I/O error: record it.
        with transaction(db):
            append_audit(db, "vault.read_failed", object_id, {"file": name, "reason": "authentication failed"})
        raise
    with transaction(db):
        append_audit(db, "vault.read", object_id, {"file": name, "bytes": size})
    return size


def read_bytes(db: sqlite_utils.Database, keys: KeyOps, home: Path, object_id: str, name: str) -> bytes:
    """The whole plaintext in memory (e.g. for `safetensors.torch.load(data)`), or an error: never partial."""
    buffer = io.BytesIO()
    try:
        read_into(db, keys, home, object_id, name, buffer)
        return buffer.getvalue()
    finally:
        buffer.close()


def list_files(home: Path, object_id: str) -> list[str]:
    folder = objects_dir(home) / object_id
    if not folder.is_dir():
        return []
    return sorted(p.name[:-len(SUFFIX)] for p in folder.iterdir() if p.name.endswith(SUFFIX)
                  and not p.name.startswith("."))


def delete_object(db: sqlite_utils.Database, home: Path, object_id: str) -> int:
    """Crypto-shred: destroy the wrapped DEK (committed, then checkpointed out of the WAL), then the
    files. Returns how many files were removed. Needs no key: shredding works while locked.

    The shred is complete only when the WAL checkpoint completes: until then an old frame or page
    can still hold the wrapped DEK. When another process's read snapshot blocks it, the object is
    recorded as pending (`records.pending_shreds`, in the same transaction as the shred) and
    `finish_pending_shreds` completes it later; callers tell the operator (`shred_pending_note`).
    """
    record = records.dek(db, object_id)
    if record.state == "shredded":
        raise ObjectError(f"object {object_id} was already deleted", hint="nothing to do")
    if record.kind == "audit":
        raise ObjectError(f"object {object_id} holds the audit anchor's seal key and is never deleted",
                          hint="it protects the audit log; it contains no data")
    users = live_references(db, home, object_id)
    if users:
        raise ObjectError(f"object {object_id} is still needed by {', '.join(users)}",
                          hint="delete those first (a model version's: `airlock models delete VERSION`); then this one")
    folder = objects_dir(home) / object_id
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    records.secure_delete(db)
    with transaction(db):
        records.shred_dek(db, object_id)
        records.forget_files(db, object_id)
        # Pending until proven otherwise: a crash before the checkpoint leaves it listed, not lost.
        records.set_pending_shreds(db, [*records.pending_shreds(db), object_id])
        append_audit(db, "vault.delete", object_id, {"kind": record.kind, "dek_id": record.dek_id,
                                                     "files": len(files)})
    for path in files:
        path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
    finish_pending_shreds(db, quietly=object_id)
    return len(files)


def live_references(db: sqlite_utils.Database, home: Path, object_id: str) -> list[str]:
    """The objects, not deleted, that declared they need this one: each by an empty file `ref.<its id>` here (a
    shared genai base graph and the model versions whose adapters run on it, appliance.optimize.genai_jobs)."""
    users = []
    for name in list_files(home, object_id):
        if name.startswith(REF_PREFIX):
            try:
                if records.dek(db, name[len(REF_PREFIX):]).state == "active":
                    users.append(name[len(REF_PREFIX):])
            except ObjectError:
                continue
    return users


def finish_pending_shreds(db: sqlite_utils.Database, *, quietly: str = "") -> list[str]:
    """Checkpoint again for every pending shred; returns those still pending (a reader still holds
    an old snapshot). A completion that comes later than its `vault.delete` row is audited
    (`vault.shred_complete`); `quietly` names the object shredded just now, whose row needs no
    sequel when it completes at once. Needs no key."""
    pending = records.pending_shreds(db)
    if not pending:
        return []
    records.secure_delete(db)
    if not records.checkpoint(db):
        return pending
    with transaction(db):
        # Re-read under the write lock: a shred committed after our checkpoint stays pending.
        now_pending = records.pending_shreds(db)
        done = [o for o in pending if o in now_pending]
        records.set_pending_shreds(db, [o for o in now_pending if o not in done])
        late = [o for o in done if o != quietly]
        if late:
            append_audit(db, "vault.shred_complete", ",".join(late)[:200],
                         {"objects": late, "wal_checkpoint": "complete"})
    return [o for o in now_pending if o not in done]


def shred_pending_note(db: sqlite_utils.Database) -> str:
    """One line for the operator when shreds are pending, else ''."""
    pending = records.pending_shreds(db)
    if not pending:
        return ""
    return (f"NOT YET COMPLETE: the destroyed key of {', '.join(pending)} may still be on disk in the catalog's "
            "write-ahead log, because another process (the server, the UI, a job) holds an old read snapshot; "
            "it is wiped when that process lets go: close it, then run `airlock vault status`")


def verify_files(db: sqlite_utils.Database, keys: KeyOps, home: Path, *, sample: int | None = None) -> VerifyReport:
    """Decrypt and authenticate every file (or a random sample), in constant memory, and report each."""
    candidates = list(_all_files(db, home))
    sampled = sample is not None and sample < len(candidates)
    if sampled:
        assert sample is not None
        candidates = secrets.SystemRandom().sample(candidates, sample)
    checks: list[FileCheck] = []
    for object_id, name, path, state in candidates:
        if state != "active":
            checks.append(FileCheck(object_id, name, str(path), False, 0,
                                    f"object {object_id} was deleted but this file remains; remove it"))
            continue
        try:
            record, dek = _dek(db, keys, object_id)
            with path.open("rb") as src:
                size = _decrypt_checked(db, src, _Discard(), dek, record, object_id, name, path)
            checks.append(FileCheck(object_id, name, str(path), True, size, ""))
        except (StreamError, ObjectError, OSError) as exc:
            checks.append(FileCheck(object_id, name, str(path), False, 0, getattr(exc, "message", str(exc))))
    failed = sum(not c.ok for c in checks)
    report = VerifyReport(failed == 0, len(checks), failed, sampled, checks)
    with transaction(db):
        append_audit(db, "vault.verify", "vault", {"files_checked": len(checks), "files_failed": failed,
                                                   "sampled": sampled,
                                                   "failed": [f"{c.object_id}/{c.name}" for c in checks
                                                              if not c.ok][:20]})
    return report


def _all_files(db: sqlite_utils.Database, home: Path) -> Iterator[tuple[str, str, Path, str]]:
    states = {r.object_id: r.state for r in records.deks(db, state=None)}
    root = objects_dir(home)
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        for name in list_files(home, folder.name):
            yield folder.name, name, folder / (name + SUFFIX), states.get(folder.name, "unknown")


def _dek(db: sqlite_utils.Database, keys: KeyOps, object_id: str) -> tuple[records.DekRecord, bytes]:
    record = records.dek(db, object_id)
    if record.state == "shredded" or record.wrapped_dek is None:
        raise ObjectError(f"object {object_id} was deleted: its key was destroyed and its data cannot be read",
                          hint="deleted objects cannot be recovered; import the data again if you still need it")
    kek = records.kek(db, record.kek_version)
    try:
        return record, keys.unwrap_dek(kek.version, kek.wrapped_kek, object_id, record.wrapped_dek)
    except (ObjectError, VaultLockedError):
        raise
    except VaultError as exc:
        raise ObjectError(f"object {object_id}: {exc.message}", hint=exc.hint) from None


def _decrypt_checked(db: sqlite_utils.Database, src: BinaryIO, dst: BinaryIO, dek: bytes,
                     record: records.DekRecord, object_id: str, name: str, path: Path) -> int:
    """Decrypt, then hold the ciphertext to the digest recorded when the file was last written: an
    older ciphertext of the same object and name authenticates (same key, same associated data),
    but it is not the file the vault wrote last. On a mismatch `dst` holds plaintext to discard."""
    hashing = _Hashing(src)
    size = decrypt_stream(hashing, dst, dek=dek, object_id=f"{object_id}/{name}", label=str(path),  # type: ignore[arg-type]
                          expected_dek_id=bytes.fromhex(record.dek_id))
    while hashing.read(1 << 20):  # trailing bytes count too
        pass
    expected = records.file_digest(db, object_id, name)
    if expected is not None and not hmac.compare_digest(expected, hashing.hexdigest()):
        raise StreamError(f"{path} is not the file the vault last wrote for {object_id}/{name} "
                          "(an older or foreign copy put in its place)",
                          hint="treat it as tampering: run `airlock vault verify` and `airlock audit verify`, "
                               "then restore the file from a backup or rebuild it")
    return size


class _Hashing:
    """A file wrapper that hashes every byte read or written through it."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner, self._hash, self.count = inner, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self._hash.update(data)
        self.count += len(data)
        return data

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.count += len(data)
        return self._inner.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _check_id(value: str, what: str) -> None:
    if not _ID.fullmatch(value) or ".." in value:
        raise ObjectError(f"{what} {value!r} is not allowed",
                          hint="use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        return len(data)
