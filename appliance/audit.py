"""Tamper-evident audit log: an append-only, hash-chained table in the catalog.

Each row is `seq, ts, actor, action, object, details, prev_hash, entry_hash` with

    entry_hash = sha256(b"audit/v1" || prev_hash || canonical_json(row without hashes))

and `prev_hash` the previous row's `entry_hash` (64 zeros for the first row). Triggers refuse
UPDATE and DELETE; someone with the sqlite3 CLI can drop them, which `verify_chain` detects,
and any edit, deletion or reordering breaks the chain at the first changed row. Cutting rows
off the end leaves a valid shorter chain: auditors keep the printed head (`seq:hash`) and pass
it back as an anchor to detect that.

Rows must be written in the same transaction as the change they record: call `append_audit`
inside `catalog.transaction(db)`. Details never hold key material or PHI; keys whose names
look like secrets are refused outright.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from appliance.catalog import transaction
from appliance.errors import AirlockError

if TYPE_CHECKING:
    import sqlite_utils

DOMAIN = b"audit/v1"
GENESIS_HASH = "0" * 64
_SECRET_KEY = re.compile(r"pass(word|phrase)|secret|private|(^|_)token$|(^|_)key$|key_material", re.I)
_EXPECTED_TRIGGERS = {"audit_log_no_update", "audit_log_no_delete"}


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"os:{user}"


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
    return AuditEntry(seq, ts, actor, action, obj, details, prev_hash, entry_hash)


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

    `anchor` = (seq, entry_hash) from an earlier verification: the row must still exist with
    that hash, which also catches rows cut off the end of the chain.
    """
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
    missing = _EXPECTED_TRIGGERS - {r[0] for r in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_log'")}
    if missing:
        return ChainReport(False, checked, head_seq, prev_hash, first_broken_seq=None,
                           reason=f"append-only triggers were dropped: {', '.join(sorted(missing))}")
    return ChainReport(True, checked, head_seq, prev_hash)

