"""The vault's catalog rows: key slots, KEK versions, wrapped DEKs, the failed-unlock counter.

Everything stored here is ciphertext or metadata (ADR 0003). Writers are called inside the
caller's `catalog.transaction(db)`, next to the audit row that records the change.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from appliance.vault.errors import ObjectError, VaultError, VaultNotInitializedError
from appliance.vault.keyslots import KdfParams, KeySlot

if TYPE_CHECKING:
    import sqlite_utils


@dataclass(frozen=True)
class Kek:
    version: int
    wrapped_kek: bytes


@dataclass(frozen=True)
class DekRecord:
    object_id: str
    kind: str
    dek_id: str
    kek_version: int
    wrapped_dek: bytes | None
    state: str  # "active" | "shredded"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def vault_id(db: sqlite_utils.Database) -> str | None:
    row = db.execute("SELECT vault_id FROM vault_meta WHERE id = 1").fetchone()
    return row[0] if row else None


def require_initialized(db: sqlite_utils.Database) -> str:
    found = vault_id(db)
    if found is None:
        raise VaultNotInitializedError("there is no vault under this AIRLOCK_HOME yet",
                                       hint="run `airlock vault init` once (it prints a recovery key to keep safe)")
    return found


def insert_meta(db: sqlite_utils.Database, new_vault_id: str) -> None:
    db.execute("INSERT INTO vault_meta (id, vault_id, created_at) VALUES (1, ?, ?)", [new_vault_id, now()])


def insert_slot(db: sqlite_utils.Database, slot: KeySlot, actor: str) -> None:
    db.execute("INSERT INTO vault_key_slots (slot_id, kind, kdf, wrapped_root, created_at, created_by)"
               " VALUES (?, ?, ?, ?, ?, ?)",
               [slot.slot_id, slot.kind, json.dumps(slot.kdf.to_dict(), sort_keys=True), slot.wrapped_root, now(),
                actor])


def replace_slot(db: sqlite_utils.Database, slot: KeySlot) -> None:
    db.execute("UPDATE vault_key_slots SET kdf = ?, wrapped_root = ? WHERE slot_id = ?",
               [json.dumps(slot.kdf.to_dict(), sort_keys=True), slot.wrapped_root, slot.slot_id])


def slots(db: sqlite_utils.Database, kind: str | None = None) -> list[KeySlot]:
    """Slots in id order. A slot whose stored parameters are malformed or over the caps is skipped:
    it can never open, and reporting it would tell a guesser nothing useful anyway."""
    sql = "SELECT slot_id, kind, kdf, wrapped_root FROM vault_key_slots"
    params: list = []
    if kind:
        sql += " WHERE kind = ?"
        params.append(kind)
    found = []
    for slot_id, slot_kind, kdf_text, wrapped in db.execute(sql + " ORDER BY slot_id", params):
        try:
            kdf = KdfParams.from_dict(json.loads(kdf_text))
        except (ValueError, TypeError, KeyError):
            continue
        found.append(KeySlot(slot_id, slot_kind, kdf, bytes(wrapped)))
    return found


def slot_summaries(db: sqlite_utils.Database) -> list[dict]:
    rows = db.execute("SELECT slot_id, kind, created_at, created_by FROM vault_key_slots ORDER BY slot_id")
    return [{"slot_id": r[0], "kind": r[1], "created_at": r[2], "created_by": r[3]} for r in rows]


def next_slot_id(db: sqlite_utils.Database, kind: str) -> str:
    """`<kind>-<n>`, n above every id this vault ever used for the kind (slots are removable since
    ADR 0012: a removed slot's id is never handed out again, so no session or audit row is confused)."""
    used = [r[0] for r in db.execute("SELECT slot_id FROM vault_key_slots WHERE kind = ?", [kind])]
    used += [r[0] for r in db.execute("SELECT object FROM audit_log WHERE action IN ('vault.add_slot', "
                                      "'vault.remove_slot') AND object LIKE ?", [f"{kind}-%"])]
    for (details,) in db.execute("SELECT details FROM audit_log WHERE action IN ('vault.init', 'vault.rekey')"):
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            used += [s for s in json.loads(details).get("slots", []) if isinstance(s, str)]
    numbers = [int(s.rsplit("-", 1)[1]) for s in used if s.startswith(f"{kind}-") and s.rsplit("-", 1)[1].isdigit()]
    return f"{kind}-{max(numbers, default=0) + 1}"


def delete_slot(db: sqlite_utils.Database, slot_id: str) -> None:
    """Destroy a slot row (call with `secure_delete` on, then `checkpoint`: the wrapped root must not linger)."""
    db.execute("DELETE FROM vault_key_slots WHERE slot_id = ?", [slot_id])


def max_kek_version(db: sqlite_utils.Database) -> int:
    return db.execute("SELECT COALESCE(MAX(version), 0) FROM vault_keks").fetchone()[0]


def active_kek(db: sqlite_utils.Database) -> Kek:
    row = db.execute("SELECT version, wrapped_kek FROM vault_keks WHERE state = 'active'"
                     " ORDER BY version DESC LIMIT 1").fetchone()
    if row is None:
        raise VaultError("the vault has no active key-encryption key", hint="restore the catalog from a backup")
    return Kek(row[0], bytes(row[1]))


def kek(db: sqlite_utils.Database, version: int) -> Kek:
    row = db.execute("SELECT wrapped_kek FROM vault_keks WHERE version = ? AND state = 'active'",
                     [version]).fetchone()
    if row is None:
        raise VaultError(f"KEK version {version} is retired or missing",
                         hint="finish the interrupted `airlock vault rotate`, or restore the catalog")
    return Kek(version, bytes(row[0]))


def insert_kek(db: sqlite_utils.Database, version: int, wrapped_kek: bytes) -> None:
    db.execute("INSERT INTO vault_keks (version, wrapped_kek, state, created_at) VALUES (?, ?, 'active', ?)",
               [version, wrapped_kek, now()])


def retire_keks_below(db: sqlite_utils.Database, version: int) -> list[int]:
    retired = [r[0] for r in db.execute("SELECT version FROM vault_keks WHERE state = 'active' AND version < ?",
                                        [version])]
    db.execute("UPDATE vault_keks SET state = 'retired', wrapped_kek = NULL, retired_at = ? "
               "WHERE state = 'active' AND version < ?", [now(), version])
    return retired


def dek(db: sqlite_utils.Database, object_id: str) -> DekRecord:
    row = db.execute("SELECT object_id, kind, dek_id, kek_version, wrapped_dek, state FROM vault_deks"
                     " WHERE object_id = ?", [object_id]).fetchone()
    if row is None:
        raise ObjectError(f"object {object_id} is not in the vault", hint="check the id with `airlock vault status`")
    return DekRecord(row[0], row[1], row[2], row[3], bytes(row[4]) if row[4] is not None else None, row[5])


def deks(db: sqlite_utils.Database, state: str | None = "active") -> list[DekRecord]:
    sql = "SELECT object_id, kind, dek_id, kek_version, wrapped_dek, state FROM vault_deks"
    rows = db.execute(sql + (" WHERE state = ?" if state else "") + " ORDER BY object_id", [state] if state else [])
    return [DekRecord(r[0], r[1], r[2], r[3], bytes(r[4]) if r[4] is not None else None, r[5]) for r in rows]


def insert_dek(db: sqlite_utils.Database, object_id: str, kind: str, dek_id: str, kek_version: int,
               wrapped_dek: bytes) -> None:
    db.execute("INSERT INTO vault_deks (object_id, kind, dek_id, kek_version, wrapped_dek, state, created_at)"
               " VALUES (?, ?, ?, ?, ?, 'active', ?)", [object_id, kind, dek_id, kek_version, wrapped_dek, now()])


def rewrap_dek(db: sqlite_utils.Database, object_id: str, kek_version: int, wrapped_dek: bytes) -> None:
    db.execute("UPDATE vault_deks SET kek_version = ?, wrapped_dek = ? WHERE object_id = ?",
               [kek_version, wrapped_dek, object_id])


def shred_dek(db: sqlite_utils.Database, object_id: str) -> None:
    db.execute("UPDATE vault_deks SET wrapped_dek = NULL, state = 'shredded', shredded_at = ? WHERE object_id = ?",
               [now(), object_id])


def unlock_failures(db: sqlite_utils.Database) -> tuple[int, str | None]:
    row = db.execute("SELECT unlock_failures, last_failure_at FROM vault_meta WHERE id = 1").fetchone()
    return (row[0], row[1]) if row else (0, None)


def record_unlock_failure(db: sqlite_utils.Database) -> int:
    db.execute("UPDATE vault_meta SET unlock_failures = unlock_failures + 1, last_failure_at = ? WHERE id = 1",
               [datetime.now(UTC).isoformat()])
    return unlock_failures(db)[0]


def reset_unlock_failures(db: sqlite_utils.Database) -> None:
    db.execute("UPDATE vault_meta SET unlock_failures = 0, last_failure_at = NULL WHERE id = 1")


def secure_delete(db: sqlite_utils.Database) -> None:
    """Zero overwritten and freed SQLite cells on this connection, so old wrapped keys do not linger."""
    db.execute("PRAGMA secure_delete=ON")


def checkpoint(db: sqlite_utils.Database, *, attempts: int = 3, busy_ms: int = 200) -> bool:
    """Fold the WAL into the database and truncate it, so old page images (old wrapped keys) go too.

    True only when SQLite says the checkpoint completed (busy flag 0): a reader holding an older
    snapshot (the server, the TUI, a job) keeps those frames alive and the WAL untruncated, and
    then this returns False after `attempts` tries of `busy_ms` each. Never raises on busy.
    """
    import sqlite3
    import time

    previous = db.execute("PRAGMA busy_timeout").fetchone()[0]
    db.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
    try:
        for attempt in range(attempts):
            try:
                busy, _log, _done = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.OperationalError:  # a writer holds the lock: same as busy
                busy = 1
            if busy == 0:
                return True
            if attempt + 1 < attempts:
                time.sleep(busy_ms / 1000)
        return False
    finally:
        db.execute(f"PRAGMA busy_timeout={int(previous)}")


PENDING_SHREDS_KEY = "vault.shreds_pending"


def pending_shreds(db: sqlite_utils.Database) -> list[str]:
    """Objects whose destroyed key may still sit in an old WAL frame or page (checkpoint blocked)."""
    row = db.execute("SELECT value FROM settings WHERE key = ?", [PENDING_SHREDS_KEY]).fetchone()
    try:
        found = json.loads(row[0]) if row else []
    except ValueError:
        found = []
    return sorted(str(x) for x in found) if isinstance(found, list) else []


def set_pending_shreds(db: sqlite_utils.Database, object_ids: list[str]) -> None:
    if object_ids:
        db.execute("INSERT INTO settings (key, value) VALUES (?, ?)"
                   " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                   [PENDING_SHREDS_KEY, json.dumps(sorted(set(object_ids)))])
    else:
        db.execute("DELETE FROM settings WHERE key = ?", [PENDING_SHREDS_KEY])


def record_file(db: sqlite_utils.Database, object_id: str, name: str, sha256: str, size: int) -> None:
    db.execute("INSERT INTO vault_files (object_id, name, sha256, bytes, written_at) VALUES (?, ?, ?, ?, ?)"
               " ON CONFLICT(object_id, name) DO UPDATE SET sha256 = excluded.sha256, bytes = excluded.bytes,"
               " written_at = excluded.written_at", [object_id, name, sha256, size, now()])


def file_digest(db: sqlite_utils.Database, object_id: str, name: str) -> str | None:
    """The SHA-256 of the file's ciphertext as last written, or None (written before digests were kept)."""
    row = db.execute("SELECT sha256 FROM vault_files WHERE object_id = ? AND name = ?", [object_id, name]).fetchone()
    return row[0] if row else None


def forget_files(db: sqlite_utils.Database, object_id: str) -> None:
    db.execute("DELETE FROM vault_files WHERE object_id = ?", [object_id])
