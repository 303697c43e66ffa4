"""Tamper-evident audit log: an append-only, hash-chained table in the catalog.

Each row is `seq, ts, actor, action, object, details, prev_hash, entry_hash` with

    entry_hash = sha256(b"audit/v1" || prev_hash || canonical_json(row without hashes))

and `prev_hash` the previous row's `entry_hash` (64 zeros for the first row). Triggers refuse
UPDATE and DELETE; someone with the sqlite3 CLI can drop them, which `verify_chain` detects,
and any edit, deletion or reordering breaks the chain at the first changed row. `verify_chain`
also compares the triggers' SQL with the text this module expects (no-op triggers under the
same names are tampering too).

Cutting rows off the end leaves a valid shorter chain, so every committed row's `seq hash` is
also appended to the anchor file outside the catalog (`anchor_path`, docs/adr/0011-anchored-
audit-chain.md), sealed with an HMAC whose key comes from the vault when this process can reach
an unlocked one (`set_anchor_key_provider`). `verify_chain` checks the chain against every
anchored head and, with the key, every seal. Auditors can still keep the printed head
(`seq:hash`) off the machine and pass it back as `anchor`.

Rows must be written in the same transaction as the change they record: call `append_audit`
inside `catalog.transaction(db)`. Details never hold key material or PHI; keys whose names
look like secrets are refused outright.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.catalog import after_commit, transaction
from appliance.errors import AirlockError

if TYPE_CHECKING:
    import sqlite_utils

DOMAIN = b"audit/v1"
GENESIS_HASH = "0" * 64
_SECRET_KEY = re.compile(r"pass(word|phrase)|secret|private|(^|_)token$|(^|_)key$|key_material", re.I)
# The exact SQL of migration 1's triggers (whitespace-normalized): same names with other bodies
# are tampering. A new trigger on audit_log (say, one that silently IGNOREs some INSERTs) is too.
_EXPECTED_TRIGGERS = {
    "audit_log_no_update": "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
                           "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    "audit_log_no_delete": "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
                           "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
}
ANCHOR_FILENAME = "audit-anchor.log"
ANCHOR_DOMAIN = b"audit-anchor/v1"
_ANCHOR_LINE = re.compile(r"v1 ([1-9][0-9]{0,18}) ([0-9a-f]{64}) ([0-9a-f]{64}|-)")
_NEGATIVE_KEY_CACHE_S = 30.0


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    ts: str
    actor: str
    action: str
    object: str
    details: dict[str, Any]
    prev_hash: str
    entry_hash: str


@dataclass(frozen=True)
class ChainReport:
    """Outcome of `verify_chain`. `first_broken_seq` is None when the chain is intact."""

    ok: bool
    rows_checked: int
    head_seq: int
    head_hash: str
    first_broken_seq: int | None = None
    reason: str = ""
    anchor: AnchorCheck | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AnchorCheck:
    """What the chain was checked against outside the catalog."""

    path: str
    exists: bool
    heads: int
    """Anchored heads in the file (one per committed row since anchoring began)."""
    first_seq: int | None
    last_seq: int | None
    sealed: int
    """Heads carrying an HMAC seal."""
    last_sealed_seq: int | None
    seals_checked: bool
    seal_note: str
    """Why seals were or were not checked (vault locked, no key yet ...)."""

    def describe(self) -> str:
        if not self.exists:
            return f"anchor {self.path}: none yet"
        seals = (f"{self.sealed} sealed, last at seq {self.last_sealed_seq}" if self.sealed else "none sealed")
        return (f"anchor {self.path}: {self.heads} heads, seq {self.first_seq}..{self.last_seq}; {seals}; "
                f"{self.seal_note}")


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept: one byte string per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def compute_entry_hash(prev_hash: str, seq: int, ts: str, actor: str, action: str, obj: str,
                       details: dict[str, Any]) -> str:
    body = canonical_json({"seq": seq, "ts": ts, "actor": actor, "action": action, "object": obj,
                           "details": details})
    return hashlib.sha256(DOMAIN + prev_hash.encode("ascii") + body.encode("utf-8")).hexdigest()


_PROCESS_ACTOR: list[str] = []


def set_process_actor(actor: str) -> None:
    """Fix the actor of every row this process writes: a job acts for the account that started it,
    whoever holds the key agent by the time it runs."""
    _PROCESS_ACTOR[:] = [actor]


def current_actor() -> str:
    """Who is acting: the process's fixed actor (jobs), else the account logged in to the key agent
    (with OS user, TTY and SSH client), else only the OS account (nobody logged in)."""
    if _PROCESS_ACTOR:
        return _PROCESS_ACTOR[0]
    from appliance.access import current_session
    from appliance.paths import airlock_home

    session = current_session(airlock_home())
    if session is not None:
        return session.actor
    return f"os:{os_user()}"


def os_user() -> str:
    """The OS account of the real uid. Never LOGNAME/USER: any process can set those."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def _check_details(details: dict[str, Any], path: str = "") -> None:
    for key, value in details.items():
        if _SECRET_KEY.search(str(key)):
            raise AirlockError(
                f"refusing to write audit details field {path}{key!r}: it looks like a secret",
                hint="audit rows record what happened, never key material; pass an id or fingerprint",
            )
        if isinstance(value, dict):
            _check_details(value, f"{path}{key}.")


def append_audit(db: sqlite_utils.Database, action: str, obj: str, details: dict[str, Any] | None = None,
                 *, actor: str | None = None) -> AuditEntry:
    """Append one row to the chain, inside the caller's transaction (or a new one)."""
    details = dict(details or {})
    _check_details(details)
    actor = actor or current_actor()
    with transaction(db):
        last = db.execute("SELECT seq, entry_hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
        ts = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        entry_hash = compute_entry_hash(prev_hash, seq, ts, actor, action, obj, details)
        db.execute(
            "INSERT INTO audit_log (seq, ts, actor, action, object, details, prev_hash, entry_hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [seq, ts, actor, action, obj, canonical_json(details), prev_hash, entry_hash],
        )
        # Only a committed row is anchored: a rolled-back one must leave no head behind.
        after_commit(db, lambda: _anchor_head(db, seq, entry_hash))
    return AuditEntry(seq, ts, actor, action, obj, details, prev_hash, entry_hash)


# -- the anchor outside the catalog ---------------------------------------------------------------

_KEY_PROVIDER: list[Callable[[sqlite_utils.Database], bytes | None]] = []
_KEY_CACHE: dict[str, tuple[bytes | None, float]] = {}
_RESOLVING: set[str] = set()


def set_anchor_key_provider(provider: Callable[[sqlite_utils.Database], bytes | None] | None) -> None:
    """Where seal keys come from: a function of the catalog returning the 32-byte HMAC key, or None
    when it cannot (vault locked). The vault layer registers one at a command's entry; this module
    never asks the key agent itself."""
    _KEY_PROVIDER[:] = [provider] if provider else []
    _KEY_CACHE.clear()


def anchor_key(db: sqlite_utils.Database) -> bytes | None:
    """The seal key for this catalog, cached per process (a miss is retried after 30 s)."""
    if not _KEY_PROVIDER:
        return None
    where = _catalog_file(db)
    cached = _KEY_CACHE.get(where)
    if cached is not None and (cached[0] is not None or time.monotonic() - cached[1] < _NEGATIVE_KEY_CACHE_S):
        return cached[0]
    if where in _RESOLVING:  # the provider's own audit rows (creating the key's object) go unsealed
        return None
    _RESOLVING.add(where)
    try:
        key = _KEY_PROVIDER[0](db)
    except Exception:  # a seal is best effort: the row has committed, never fail it now
        key = None
    finally:
        _RESOLVING.discard(where)
    _KEY_CACHE[where] = (key, time.monotonic())
    return key


def anchor_path(db: sqlite_utils.Database) -> Path | None:
    """`AIRLOCK_AUDIT_ANCHOR` if set (another filesystem, a WORM mount), else `audit-anchor.log`
    beside the catalog. None for an in-memory catalog."""
    configured = os.environ.get("AIRLOCK_AUDIT_ANCHOR")
    if configured:
        return Path(configured).expanduser()
    where = _catalog_file(db)
    return Path(where).parent / ANCHOR_FILENAME if where else None


def _catalog_file(db: sqlite_utils.Database) -> str:
    cached = getattr(db, "_airlock_catalog_file", None)
    if cached is None:
        row = next((r for r in db.execute("PRAGMA database_list") if r[1] == "main"), None)
        cached = (row[2] or "") if row else ""
        db._airlock_catalog_file = cached  # type: ignore[attr-defined]
    return cached


def seal(key: bytes, seq: int, entry_hash: str) -> str:
    return hmac.new(key, ANCHOR_DOMAIN + f"{seq}:{entry_hash}".encode("ascii"), hashlib.sha256).hexdigest()


def _anchor_head(db: sqlite_utils.Database, seq: int, entry_hash: str) -> None:
    """Append `v1 SEQ HASH SEAL|-` to the anchor file: one write() on an O_APPEND descriptor, so
    concurrent writers never interleave. Not fsynced: the catalog row is the durable record; a
    line lost to a power cut only shortens the anchor, it never contradicts the chain."""
    path = anchor_path(db)
    if path is None:
        return
    key = anchor_key(db)
    line = f"v1 {seq} {entry_hash} {seal(key, seq, entry_hash) if key else '-'}\n".encode("ascii")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        # The row is committed; failing the command now would report an error for a change that
        # happened. Say so loudly instead: `audit verify` will show the gap.
        print(f"warning: audit row {seq} was not anchored in {path}: {exc.strerror or exc}", file=sys.stderr)


def _read_anchor(path: Path) -> tuple[dict[int, tuple[str, str]], str]:
    """seq -> (hash, seal or '-'), or an error text for a malformed or contradictory file."""
    heads: dict[int, tuple[str, str]] = {}
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            match = _ANCHOR_LINE.fullmatch(raw.rstrip(b"\n").decode("ascii", "replace"))
            if match is None:
                return heads, f"line {number} of the anchor file is malformed (edited)"
            seq, digest, sealed = int(match[1]), match[2], match[3]
            if seq in heads and heads[seq][0] != digest:
                return heads, f"the anchor file holds two different hashes for seq {seq} (history rewritten)"
            if seq not in heads or sealed != "-":
                heads[seq] = (digest, sealed)
    return heads, ""


def iter_audit(db: sqlite_utils.Database, *, since_seq: int = 0, action: str | None = None,
               limit: int | None = None, newest_first: bool = False) -> Iterator[AuditEntry]:
    sql = "SELECT seq, ts, actor, action, object, details, prev_hash, entry_hash FROM audit_log WHERE seq > ?"
    params: list[Any] = [since_seq]
    if action:
        # A trailing dot selects a family: "vault." matches vault.init, vault.unlock ...
        if action.endswith("."):
            sql += " AND action LIKE ? ESCAPE '\\'"
            params.append(action.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        else:
            sql += " AND action = ?"
            params.append(action)
    sql += " ORDER BY seq DESC" if newest_first else " ORDER BY seq"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    for row in db.execute(sql, params):
        yield AuditEntry(row[0], row[1], row[2], row[3], row[4], _parse_details(row[5]), row[6], row[7])


def _parse_details(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {"_unparseable": True}
    return value if isinstance(value, dict) else {"_not_an_object": True}


def verify_chain(db: sqlite_utils.Database, *, anchor: tuple[int, str] | None = None) -> ChainReport:
    """Walk the whole chain in seq order (streaming) and name the first broken row.

    Checked in this order: every row's hash and link; every head in the anchor file (a head past
    the chain's end means rows were cut off); the anchor's seals, when this process has the key;
    the triggers' SQL. `anchor` = (seq, entry_hash) from an earlier verification (kept off the
    machine): the row must still exist with that hash.
    """
    found = _load_anchor(db)
    heads, anchor_error, check = found
    broken = _walk(db, anchor, heads)
    if isinstance(broken, ChainReport):
        return _with_anchor(broken, check)
    checked, head_seq, head_hash = broken
    if anchor_error:
        return ChainReport(False, checked, head_seq, head_hash, reason=anchor_error, anchor=check)
    if check is not None and check.exists and check.last_seq is not None and check.last_seq > head_seq:
        return ChainReport(False, checked, head_seq, head_hash, first_broken_seq=head_seq + 1, anchor=check,
                           reason=f"the chain ends at seq {head_seq} but the anchor file recorded seq "
                                  f"{check.last_seq} (rows cut off the end)")
    if check is not None and not check.exists and checked:
        return ChainReport(False, checked, head_seq, head_hash, anchor=check,
                           reason=f"the anchor file {check.path} is missing (deleted?) while the chain has rows; "
                                  "a catalog written before anchoring existed gets its anchor with its next row")
    if check is not None and check.seals_checked:
        key = anchor_key(db)
        assert key is not None
        for seq, (digest, sealed) in sorted(heads.items()):
            if sealed != "-" and not hmac.compare_digest(sealed, seal(key, seq, digest)):
                return ChainReport(False, checked, head_seq, head_hash, first_broken_seq=seq, anchor=check,
                                   reason=f"the seal of anchored head {seq} does not verify with the vault's "
                                          "audit key (anchor file forged)")
    triggers = {name: " ".join((sql or "").split()) for name, sql in db.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_log'")}
    missing = sorted(set(_EXPECTED_TRIGGERS) - set(triggers))
    if missing:
        return ChainReport(False, checked, head_seq, head_hash, anchor=check,
                           reason=f"append-only triggers were dropped: {', '.join(missing)}")
    changed = sorted(name for name, sql in triggers.items() if _EXPECTED_TRIGGERS.get(name) != sql)
    if changed:
        return ChainReport(False, checked, head_seq, head_hash, anchor=check,
                           reason=f"triggers on audit_log differ from the appliance's: {', '.join(changed)} "
                                  "(replaced or added; the append-only guard is not the original)")
    return ChainReport(True, checked, head_seq, head_hash, anchor=check)


def _with_anchor(report: ChainReport, check: AnchorCheck | None) -> ChainReport:
    return ChainReport(report.ok, report.rows_checked, report.head_seq, report.head_hash, report.first_broken_seq,
                       report.reason, check)


def _load_anchor(db: sqlite_utils.Database) -> tuple[dict[int, tuple[str, str]], str, AnchorCheck | None]:
    path = anchor_path(db)
    if path is None:
        return {}, "", None
    if not path.exists():
        return {}, "", AnchorCheck(str(path), False, 0, None, None, 0, None, False, "")
    try:
        heads, error = _read_anchor(path)
    except OSError as exc:
        return {}, f"cannot read the anchor file {path}: {exc.strerror or exc}", None
    sealed = [seq for seq, (_, mark) in heads.items() if mark != "-"]
    key = anchor_key(db) if sealed else None
    if not sealed:
        note = "no seals to check"
    elif key is not None:
        note = "seals verified with the vault's audit key"
    elif _KEY_PROVIDER:
        note = "seals NOT checked: the vault is locked (unlock and verify again)"
    else:
        note = "seals NOT checked: no vault key in this process"
    check = AnchorCheck(str(path), True, len(heads), min(heads, default=None), max(heads, default=None),
                        len(sealed), max(sealed, default=None), key is not None, note)
    return heads, error, check


def _walk(db: sqlite_utils.Database, anchor: tuple[int, str] | None, heads: dict[int, tuple[str, str]]
          ) -> ChainReport | tuple[int, int, str]:
    expected_seq, prev_hash, checked = 1, GENESIS_HASH, 0
    anchor_seen = anchor is None
    rows = db.execute("SELECT seq, ts, actor, action, object, details, prev_hash, entry_hash"
                      " FROM audit_log ORDER BY seq")
    for seq, ts, actor, action, obj, details_text, stored_prev, stored_hash in rows:
        checked += 1
        reason = ""
        if seq != expected_seq:
            reason = (f"row {expected_seq} is missing (next row is seq {seq})" if seq > expected_seq
                      else f"seq {seq} is out of order")
            seq = expected_seq
        elif stored_prev != prev_hash:
            reason = "prev_hash does not match the previous row's entry_hash (row removed or reordered)"
        else:
            try:
                details = json.loads(details_text)
            except (TypeError, ValueError):
                details = None
            if not isinstance(details, dict):
                reason = "details are not a JSON object (row edited)"
            elif compute_entry_hash(stored_prev, seq, ts, actor, action, obj, details) != stored_hash:
                reason = "entry_hash does not match the row's contents (row edited)"
            elif seq in heads and heads[seq][0] != stored_hash:
                reason = "entry_hash differs from the head the anchor file recorded (history rewritten)"
        if reason:
            return ChainReport(False, checked, seq - 1, prev_hash, first_broken_seq=seq, reason=reason)
        if anchor is not None and seq == anchor[0]:
            if stored_hash != anchor[1]:
                return ChainReport(False, checked, seq, stored_hash, first_broken_seq=seq,
                                   reason="entry_hash differs from the anchor you recorded (history rewritten)")
            anchor_seen = True
        prev_hash, expected_seq = stored_hash, expected_seq + 1
    head_seq = expected_seq - 1
    if not anchor_seen:
        assert anchor is not None
        return ChainReport(False, checked, head_seq, prev_hash, first_broken_seq=head_seq + 1,
                           reason=f"the chain ends at seq {head_seq}, before the anchor seq {anchor[0]} "
                                  "(rows cut off the end)")
    return checked, head_seq, prev_hash
