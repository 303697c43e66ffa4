"""Operator accounts: one person, one passphrase key slot (LUKS-style), one role, one lockout counter.

Every account's slot wraps the same root key, so adding or disabling an account changes nobody
else's passphrase; disabling destroys the account's slot (secure_delete + WAL checkpoint), after
which its passphrase opens nothing. Adding an account or resetting someone's passphrase needs
an admin to type their own passphrase again: the root key must be opened to wrap the new slot,
and the agent never hands the root key out. Five failed unlocks lock an account for a growing
interval; every failure and lock is audited. See docs/adr/0006-accounts-and-roles.md.
"""

from __future__ import annotations

import getpass
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from appliance.access import ROLES, Session
from appliance.audit import append_audit
from appliance.catalog import transaction
from appliance.vault import records
from appliance.vault.errors import UnlockError, VaultError
from appliance.vault.keyslots import KdfParams, wrap_root

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.vault.lifecycle import Credential

MAX_FAILURES = 5
LOCKOUT_BASE_S = 60
LOCKOUT_MAX_S = 24 * 3600
_NAME = re.compile(r"[a-z][a-z0-9._-]{1,31}")
RESERVED = {"break-glass", "scheduler", "system", "root", "migration"}


class AccountError(VaultError):
    """An account name, role or state does not allow the request."""


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    slot_id: str | None
    state: str
    created_at: str
    created_by: str
    failed_unlocks: int
    locked_until: str | None
    last_unlock_at: str | None

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "state": self.state, "created_at": self.created_at,
                "created_by": self.created_by, "failed_unlocks": self.failed_unlocks,
                "locked_until": self.locked_until, "last_unlock_at": self.last_unlock_at}


_COLUMNS = "name, role, slot_id, state, created_at, created_by, failed_unlocks, locked_until, last_unlock_at"


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(when: datetime | None = None) -> str:
    return (when or _now()).isoformat(timespec="seconds").replace("+00:00", "Z")


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name in RESERVED:
        raise AccountError(f"account name {name!r} is not allowed",
                           hint="use 2-32 lowercase letters, digits, '.', '_' or '-', starting with a letter")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise AccountError(f"unknown role {role!r}", hint=f"use one of: {', '.join(ROLES)}")
    return role


def get(db: sqlite_utils.Database, name: str) -> Account:
    row = db.execute(f"SELECT {_COLUMNS} FROM users WHERE name = ?", [name]).fetchone()
    if row is None:
        raise AccountError(f"no account named {name!r}", hint="list accounts with `airlock users list`")
    return Account(*row)


def all_accounts(db: sqlite_utils.Database) -> list[Account]:
    return [Account(*r) for r in db.execute(f"SELECT {_COLUMNS} FROM users ORDER BY name")]


def for_slot(db: sqlite_utils.Database, slot_id: str) -> Account | None:
    row = db.execute(f"SELECT {_COLUMNS} FROM users WHERE slot_id = ?", [slot_id]).fetchone()
    return Account(*row) if row else None


def resolve_name(db: sqlite_utils.Database, given: str | None) -> str:
    """The account an unlock is for: --user, else the OS user's own account, else the only account."""
    if given:
        return given
    active = [a for a in all_accounts(db) if a.state == "active"]
    try:
        os_user = getpass.getuser()
    except (KeyError, OSError):
        os_user = ""
    if any(a.name == os_user for a in active):
        return os_user
    if len(active) == 1:
        return active[0].name
    raise AccountError("there are several accounts: say which one is yours",
                       hint="pass --user NAME (see `airlock users list`)")


def insert(db: sqlite_utils.Database, name: str, role: str, slot_id: str, actor: str) -> None:
    db.execute("INSERT INTO users (name, role, slot_id, state, created_at, created_by)"
               " VALUES (?, ?, ?, 'active', ?, ?)", [name, role, slot_id, _stamp(), actor])


# --- lockout -------------------------------------------------------------------------------------------------------

def lockout_seconds(failures: int) -> int:
    """0 below MAX_FAILURES; then 1 min, 2 min, 4 min ... up to a day."""
    if failures < MAX_FAILURES:
        return 0
    return min(LOCKOUT_MAX_S, LOCKOUT_BASE_S * 2 ** (failures - MAX_FAILURES))


def check_not_locked(db: sqlite_utils.Database, account: Account, actor: str) -> None:
    if account.state != "active":
        with transaction(db):
            append_audit(db, "user.unlock_refused", account.name, {"reason": "disabled"}, actor=actor)
        raise UnlockError(f"the account {account.name} is disabled", hint="ask an admin (`airlock users list`)")
    if account.locked_until and datetime.fromisoformat(account.locked_until.replace("Z", "+00:00")) > _now():
        with transaction(db):
            append_audit(db, "user.unlock_refused", account.name, {"reason": "locked out",
                                                                   "locked_until": account.locked_until}, actor=actor)
        raise UnlockError(f"the account {account.name} is locked after {account.failed_unlocks} failed unlocks "
                          f"until {account.locked_until}",
                          hint="wait, or ask an admin; the recovery key gives emergency access (audited)")


def record_failure(db: sqlite_utils.Database, name: str, actor: str) -> int:
    """Count a failed unlock for `name` (inside the caller's transaction); lock the account at the limit."""
    db.execute("UPDATE users SET failed_unlocks = failed_unlocks + 1 WHERE name = ?", [name])
    failures = db.execute("SELECT failed_unlocks FROM users WHERE name = ?", [name]).fetchone()[0]
    seconds = lockout_seconds(failures)
    if seconds:
        until = _stamp(_now() + timedelta(seconds=seconds))
        db.execute("UPDATE users SET locked_until = ? WHERE name = ?", [until, name])
        append_audit(db, "user.locked", name, {"failed_unlocks": failures, "locked_until": until,
                                               "lockout_s": seconds}, actor=actor)
    return failures


def record_success(db: sqlite_utils.Database, name: str) -> None:
    db.execute("UPDATE users SET failed_unlocks = 0, locked_until = NULL, last_unlock_at = ? WHERE name = ?",
               [_stamp(), name])


# --- managing accounts ---------------------------------------------------------------------------------------------

def _open_as_admin(db: sqlite_utils.Database, session: Session, admin_credential: Credential) -> bytes:
    """Re-authenticate the acting admin (or break-glass) and return the root key for wrapping a slot."""
    from appliance.vault.lifecycle import open_root

    if session.role != "admin":
        raise AccountError(f"managing accounts needs the admin role; {session.account} is {session.role}",
                           hint="ask an admin")
    account = None if session.kind == "emergency" else session.account
    _, root_key = open_root(db, admin_credential, account=account)
    return root_key


def add_user(db: sqlite_utils.Database, session: Session, admin_credential: Credential, name: str, role: str,
             passphrase: str, kdf: KdfParams) -> str:
    """Create an account with its own passphrase slot. Returns the slot id."""
    check_name(name)
    check_role(role)
    existing = db.execute("SELECT state FROM users WHERE name = ?", [name]).fetchone()
    if existing is not None:
        raise AccountError(f"the account {name} already exists ({existing[0]})",
                           hint="choose another name; disabled accounts keep their name for the audit trail")
    root_key = _open_as_admin(db, session, admin_credential)
    slot_id = f"user-{name}"
    slot = wrap_root(root_key, slot_id=slot_id, kind="passphrase", kdf=kdf, secret=passphrase.encode("utf-8"))
    del root_key
    with transaction(db):
        records.insert_slot(db, slot, session.actor)
        insert(db, name, role, slot_id, session.actor)
        append_audit(db, "user.add", name, {"role": role, "slot_id": slot_id, "kdf": kdf.describe()},
                     actor=session.actor)
    return slot_id


def disable_user(db: sqlite_utils.Database, session: Session, name: str) -> None:
    """Destroy the account's key slot; its passphrase opens nothing from now on. Needs no passphrase."""
    account = get(db, name)
    if account.state != "active":
        raise AccountError(f"the account {name} is already disabled", hint="nothing to do")
    admins = [a for a in all_accounts(db) if a.state == "active" and a.role == "admin"]
    if account.role == "admin" and len(admins) == 1:
        raise AccountError(f"{name} is the last admin account", hint="add another admin first (`airlock users add`)")
    records.secure_delete(db)
    with transaction(db):
        db.execute("UPDATE users SET state = 'disabled', slot_id = NULL, disabled_at = ? WHERE name = ?",
                   [_stamp(), name])
        db.execute("DELETE FROM vault_key_slots WHERE slot_id = ?", [account.slot_id])
        append_audit(db, "user.disable", name, {"role": account.role, "slot_destroyed": account.slot_id},
                     actor=session.actor)
    records.checkpoint(db)


def set_passphrase(db: sqlite_utils.Database, credential: Credential, name: str, new_passphrase: str,
                   kdf: KdfParams, *, session: Session | None = None) -> str:
    """Re-wrap `name`'s slot with a new passphrase.

    `credential` is `name`'s own current passphrase, or (with an admin `session`) the admin's own
    passphrase: an admin resetting a forgotten one. The recovery key also works (break-glass)."""
    from appliance.vault.lifecycle import open_root

    account = get(db, name)
    if account.state != "active" or account.slot_id is None:
        raise AccountError(f"the account {name} is disabled", hint="add a new account instead")
    if credential.kind == "passphrase" and session is not None and session.account != name:
        root_key = _open_as_admin(db, session, credential)
        how = "reset by admin"
    else:
        _, root_key = open_root(db, credential, account=name if credential.kind == "passphrase" else None)
        how = "own passphrase" if credential.kind == "passphrase" else credential.kind
    slot = wrap_root(root_key, slot_id=account.slot_id, kind="passphrase", kdf=kdf,
                     secret=new_passphrase.encode("utf-8"))
    del root_key
    actor = session.actor if session is not None else name
    with transaction(db):
        records.replace_slot(db, slot)
        db.execute("UPDATE users SET failed_unlocks = 0, locked_until = NULL WHERE name = ?", [name])
        append_audit(db, "user.passwd", name, {"how": how, "kdf": kdf.describe()}, actor=actor)
    return account.slot_id


def record_emergency(db: sqlite_utils.Database, origin: str, agent_pid: int) -> int:
    db.execute("INSERT INTO emergency_access (started_at, origin, agent_pid) VALUES (?, ?, ?)",
               [_stamp(), origin, agent_pid])
    return db.execute("SELECT last_insert_rowid()").fetchone()[0]


def pending_emergencies(db: sqlite_utils.Database) -> list[dict]:
    rows = db.execute("SELECT id, started_at, origin FROM emergency_access WHERE acknowledged_at IS NULL ORDER BY id")
    return [{"id": r[0], "started_at": r[1], "origin": r[2]} for r in rows]


def acknowledge_emergency(db: sqlite_utils.Database, session: Session, emergency_id: int, note: str) -> None:
    if session.kind == "emergency":
        raise AccountError("an emergency session cannot acknowledge itself",
                           hint="an admin logs in with their own account and acknowledges it")
    with transaction(db):
        row = db.execute("SELECT acknowledged_at FROM emergency_access WHERE id = ?", [emergency_id]).fetchone()
        if row is None or row[0] is not None:
            raise AccountError(f"no unacknowledged emergency access #{emergency_id}",
                               hint="see `airlock users emergencies`")
        db.execute("UPDATE emergency_access SET acknowledged_by = ?, acknowledged_at = ?, note = ? WHERE id = ?",
                   [session.account, _stamp(), note, emergency_id])
        append_audit(db, "emergency.acknowledge", f"emergency-{emergency_id}", {"note": note}, actor=session.actor)
