"""Vault lifecycle: init, unlock (with growing back-off), lock, passwd, add-slot, rotate.

Each state change is written together with its audit row in one `catalog.transaction(db)`.
Audit rows name slot ids, kinds and KDF parameters, never secrets.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.audit import append_audit, current_actor
from appliance.catalog import transaction
from appliance.vault import records
from appliance.vault.agent import (
    AgentClient,
    AgentStatus,
    Identity,
    agent_status,
    start_agent,
    unlock_serialized,
)
from appliance.vault.errors import UnlockError, VaultError, VaultLockedError
from appliance.vault.keys import KeyOps, LocalKeys, disable_core_dumps
from appliance.vault.keyslots import (
    KdfParams,
    create_machine_key,
    hkdf_params,
    new_recovery_key,
    parse_recovery_key,
    read_machine_key,
    unwrap_root,
    wrap_root,
)

if TYPE_CHECKING:
    import sqlite_utils

BACKOFF_BASE_S = 0.25
BACKOFF_MAX_S = 30.0
_CREDENTIAL_NAMES = {"passphrase": "passphrase", "recovery": "recovery key", "machine": "machine key"}


@dataclass(frozen=True)
class Credential:
    """Something that opens a slot. `kind` is a slot kind; `secret` never reaches an audit row."""

    kind: str
    secret: bytes

    @classmethod
    def passphrase(cls, text: str) -> Credential:
        return cls("passphrase", text.encode("utf-8"))

    @classmethod
    def recovery(cls, text: str) -> Credential:
        return cls("recovery", parse_recovery_key(text))

    @classmethod
    def machine(cls, path: Path) -> Credential:
        return cls("machine", read_machine_key(path))


@dataclass(frozen=True)
class InitResult:
    vault_id: str
    recovery_key: str  # shown once to the operator, never stored
    slot_ids: list[str]
    kdf: dict


def default_machine_key_path(home: Path) -> Path:
    return home / "vault" / "machine.key"


def backoff_seconds(failures: int) -> float:
    return 0.0 if failures <= 0 else min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (failures - 1))


def init_vault(db: sqlite_utils.Database, passphrase: str, kdf: KdfParams, *,
               machine_key_file: Path | None = None, admin: str = "admin") -> InitResult:
    """Create the root key, its slots, KEK version 1 and the first (admin) account. Refuses when a vault exists."""
    from appliance.vault import accounts

    accounts.check_name(admin)
    if records.vault_id(db) is not None:
        raise VaultError("this AIRLOCK_HOME already has a vault",
                         hint="use `airlock vault add-slot` or `airlock vault passwd` to change how it unlocks")
    disable_core_dumps()
    root_key = os.urandom(32)
    keys = LocalKeys(root_key)
    recovery_secret, recovery_text = new_recovery_key()
    machine_secret = create_machine_key(machine_key_file) if machine_key_file else None
    new_vault_id = uuid.uuid4().hex
    slots = [wrap_root(root_key, slot_id="passphrase-1", kind="passphrase", kdf=kdf, secret=passphrase.encode()),
             wrap_root(root_key, slot_id="recovery-1", kind="recovery", kdf=hkdf_params(), secret=recovery_secret)]
    if machine_secret is not None:
        slots.append(wrap_root(root_key, slot_id="machine-1", kind="machine", kdf=hkdf_params(),
                               secret=machine_secret))
    try:
        with transaction(db):
            records.insert_meta(db, new_vault_id)
            for slot in slots:
                records.insert_slot(db, slot, current_actor())
            records.insert_kek(db, 1, keys.new_kek(1))
            accounts.insert(db, admin, "admin", "passphrase-1", current_actor())
            append_audit(db, "vault.init", "vault", {
                "vault_id": new_vault_id, "slots": [s.slot_id for s in slots], "kdf": kdf.describe(),
                "kek_version": 1, "machine_slot": machine_secret is not None, "admin_account": admin,
                "machine_key_file": str(machine_key_file) if machine_key_file else None})
    except BaseException:
        if machine_key_file:
            with contextlib.suppress(OSError):
                machine_key_file.unlink()
        raise
    finally:
        keys.wipe()
    return InitResult(new_vault_id, recovery_text, [s.slot_id for s in slots], kdf.describe())


def open_root(db: sqlite_utils.Database, credential: Credential, *, account: str | None = None
              ) -> tuple[str, bytes]:
    """(slot_id, root key) for a credential, or UnlockError after a growing, audited delay.

    A passphrase opens only the slot of `account` when one is named (and counts towards that
    account's lockout). Every failure reads the same, whether the secret or the slot is wrong.
    The failure count lives in the catalog, so restarting the command does not reset the delay.
    """
    from appliance.vault import accounts

    records.require_initialized(db)
    disable_core_dumps()
    named = None
    if account is not None and credential.kind == "passphrase":
        named = accounts.get(db, account)
        accounts.check_not_locked(db, named, current_actor())
    failures, last = records.unlock_failures(db)
    if last:
        pending = backoff_seconds(failures) - (datetime.now(UTC) - datetime.fromisoformat(last)).total_seconds()
        if pending > 0:
            time.sleep(pending)
    if credential.secret:
        for slot in records.slots(db, kind=credential.kind):
            if named is not None and slot.slot_id != named.slot_id:
                continue
            root_key = unwrap_root(slot, credential.secret)
            if root_key is not None:
                with transaction(db):
                    records.reset_unlock_failures(db)
                    if named is not None:
                        accounts.record_success(db, named.name)
                return slot.slot_id, root_key
    with transaction(db):
        failures = records.record_unlock_failure(db)
        delay = backoff_seconds(failures)
        details = {"credential": credential.kind, "failures": failures, "delay_s": delay}
        if named is not None:
            details["account"] = named.name
            details["account_failures"] = accounts.record_failure(db, named.name, current_actor())
        append_audit(db, "vault.unlock_failed", named.name if named is not None else "vault", details)
    time.sleep(delay)
    name = _CREDENTIAL_NAMES.get(credential.kind, credential.kind)
    raise UnlockError(f"the vault did not unlock: that {name} is not correct",
                      hint="try again (each failed attempt waits longer and is audited); "
                           "a lost passphrase can be replaced with the recovery key: `airlock vault passwd "
                           "--recovery-key-file FILE`")


def unlock_vault(db: sqlite_utils.Database, home: Path, credential: Credential, idle_timeout_s: int,
                 account: str | None = None) -> AgentStatus:
    """Open a slot and hand the root key, and who opened it, to a new key agent.

    A passphrase logs in its account (with its role); the recovery key is break-glass access
    (admin for this session, flagged until an admin acknowledges it); the machine key is the
    `scheduler`. The credential is always checked, even when a session is already running (a
    running session is no proof of who types now). An agent already running for this vault is
    replaced only when someone else logs in: the same account unlocking again keeps it, and a
    machine-key unlock never ends a person's session. Unlocks of one vault run one at a time
    (`unlock_serialized`), so two racing unlocks cannot orphan an agent that holds the key.
    """
    from appliance.access import origin
    from appliance.vault import accounts

    vault_id = records.require_initialized(db)
    if credential.kind == "passphrase":
        account = accounts.resolve_name(db, account)
    slot_id, root_key = open_root(db, credential, account=account if credential.kind == "passphrase" else None)
    where = origin()
    if credential.kind == "passphrase":
        owner = accounts.for_slot(db, slot_id)
        if owner is None:
            raise UnlockError("this passphrase slot belongs to no account",
                              hint="an admin adds your account with `airlock users add`")
        identity = Identity(owner.name, owner.role, "normal", where, slot_id)
    elif credential.kind == "recovery":
        identity = Identity("break-glass", "admin", "emergency", where, slot_id)
    else:
        identity = Identity("scheduler", "scheduler", "scheduler", where, slot_id)
    with unlock_serialized(home):
        running = agent_status(home)
        if running is not None and running.vault_id == vault_id and (
                credential.kind == "machine" or (identity.session == "normal" and running.account == identity.account)):
            # The same person again, or unattended jobs (they use whoever is logged in and never
            # end a person's session): keep the running agent. The credential was checked above.
            del root_key
            return running
        if running is not None:  # someone else's session, or another vault's agent: end it, do not orphan it
            with contextlib.suppress(VaultError):
                AgentClient(home).lock()
        status = start_agent(home, root_key, vault_id, idle_timeout_s, identity)
    del root_key
    actor = identity.account if identity.session == "normal" else f"{identity.account} [{identity.session}]"
    with transaction(db):
        details = {"slot_id": slot_id, "credential": credential.kind, "idle_timeout_s": idle_timeout_s,
                   "agent_pid": status.pid, "account": identity.account, "role": identity.role}
        if identity.session == "emergency":
            details["emergency"] = True
            details["emergency_id"] = accounts.record_emergency(db, where, status.pid)
        append_audit(db, "vault.unlock", "vault", details, actor=f"{actor} ({where})")
    return status


def lock_vault(db: sqlite_utils.Database, home: Path) -> bool:
    """Stop the agent (which wipes the key). Returns False when it was not running."""
    status = agent_status(home)
    if status is None:
        return False
    actor = current_actor()  # while the session still exists
    with contextlib.suppress(VaultLockedError):
        AgentClient(home).lock()
    with transaction(db):
        append_audit(db, "vault.lock", "vault", {"reason": "operator", "agent_pid": status.pid}, actor=actor)
    return True


def keys_for(db: sqlite_utils.Database, home: Path) -> KeyOps:
    """The running agent for this vault, or VaultLockedError ("vault is locked" + hint)."""
    return AgentClient(home, expected_vault_id=records.require_initialized(db))


def change_passphrase(db: sqlite_utils.Database, credential: Credential, new_passphrase: str,
                      kdf: KdfParams, account: str | None = None) -> str:
    """Re-wrap a passphrase slot with a new passphrase (nothing else changes). Returns the slot id.

    With the old passphrase, its own slot is re-wrapped; with the recovery key, the slot of
    `account` (default: the only account) is (the way back from a forgotten passphrase).
    """
    from appliance.vault import accounts

    slot_id, root_key = open_root(db, credential)
    if credential.kind != "passphrase":
        target = accounts.get(db, accounts.resolve_name(db, account))
        if target.slot_id is None:
            raise VaultError(f"the account {target.name} is disabled", hint="add a new account instead")
        slot_id = target.slot_id
    slot = wrap_root(root_key, slot_id=slot_id, kind="passphrase", kdf=kdf, secret=new_passphrase.encode("utf-8"))
    del root_key
    with transaction(db):
        records.replace_slot(db, slot)
        append_audit(db, "vault.passwd", slot_id, {"credential": credential.kind, "kdf": kdf.describe()})
    return slot_id


def add_slot(db: sqlite_utils.Database, credential: Credential, kind: str, *, passphrase: str | None = None,
             kdf: KdfParams | None = None, machine_key_file: Path | None = None) -> tuple[str, str | None]:
    """Add a recovery or machine slot (passphrase slots belong to accounts: `users add`).

    The credential must open an admin's slot or be the recovery key. Returns (slot_id, recovery
    key text for a recovery slot, else None)."""
    from appliance.vault import accounts

    if kind == "passphrase":
        raise VaultError("passphrase slots belong to accounts", hint="add a person with `airlock users add NAME`")
    slot_used, root_key = open_root(db, credential)
    owner = accounts.for_slot(db, slot_used)
    if credential.kind == "machine" or (credential.kind == "passphrase" and (owner is None or owner.role != "admin")):
        del root_key
        raise VaultError("adding a key slot needs an admin's passphrase (or the recovery key)",
                         hint="ask an admin to run `airlock vault add-slot`")
    shown: str | None = None
    if kind == "passphrase":
        if passphrase is None or kdf is None:
            raise ValueError("a passphrase slot needs a passphrase and KDF parameters")
        secret, slot_kdf = passphrase.encode("utf-8"), kdf
    elif kind == "recovery":
        secret, shown = new_recovery_key()
        slot_kdf = hkdf_params()
    elif kind == "machine":
        if machine_key_file is None:
            raise ValueError("a machine slot needs a key file path")
        secret, slot_kdf = create_machine_key(machine_key_file), hkdf_params()
    else:
        raise VaultError(f"unknown slot kind {kind!r}", hint="use passphrase, recovery or machine")
    slot_id = records.next_slot_id(db, kind)
    slot = wrap_root(root_key, slot_id=slot_id, kind=kind, kdf=slot_kdf, secret=secret)
    del root_key
    with transaction(db):
        records.insert_slot(db, slot, current_actor())
        append_audit(db, "vault.add_slot", slot_id, {
            "kind": kind, "credential": credential.kind, "kdf": slot_kdf.describe(),
            "machine_key_file": str(machine_key_file) if machine_key_file else None})
    return slot_id, shown


def rotate_keks(db: sqlite_utils.Database, keys: KeyOps) -> tuple[int, int]:
    """New KEK version; every DEK re-wrapped under it; older KEKs destroyed. Data files are untouched.

    Returns (new version, DEKs re-wrapped). All in one transaction: a crash leaves the old state.
    """
    records.require_initialized(db)
    records.secure_delete(db)
    with transaction(db):
        old = records.active_kek(db)
        new_version = old.version + 1
        new_wrapped = keys.new_kek(new_version)
        records.insert_kek(db, new_version, new_wrapped)
        rewrapped = 0
        for record in records.deks(db):
            assert record.wrapped_dek is not None
            source = records.kek(db, record.kek_version)
            wrapped = keys.rewrap_dek(source.version, source.wrapped_kek, new_version, new_wrapped,
                                      record.object_id, record.wrapped_dek)
            records.rewrap_dek(db, record.object_id, new_version, wrapped)
            rewrapped += 1
        retired = records.retire_keks_below(db, new_version)
        append_audit(db, "vault.rotate", "vault", {"kek_version": new_version, "retired_versions": retired,
                                                   "deks_rewrapped": rewrapped})
    records.checkpoint(db)
    return new_version, rewrapped
