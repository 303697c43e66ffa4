"""Revoking key slots and re-keying the vault (ADR 0012).

`remove_slot` destroys one way of unlocking (a recovery or machine slot, or an account's slot,
which disables the account); the last admin's slot is never removed. Removing a slot stops the
secret from opening the *current* catalog, but a copy of the catalog taken earlier still holds
that slot, and the secret opens the old root key in it. `rekey` closes that door for everything
written afterwards:

    new root key (random)            old slots, and the old root key, open nothing current
    new KEK (random, not a re-wrap)  an old KEK (from an old backup + old secret) opens no current DEK
    every DEK re-wrapped under it    data files are untouched; new objects get new DEKs
    every slot re-created            the acting admin's from the passphrase they typed; every other
                                     account's under a one-time handover passphrase printed once
                                     (they change it with `airlock users passwd`); one new recovery
                                     key, printed once; a new machine key file where one existed

Objects that existed before the re-key keep their DEKs (re-wrapped): whoever holds an old backup
and an old secret can still read those objects' files (they could before: the backup already
had their keys). What they cannot read is anything created after the re-key. Everything happens
in one catalog transaction with its audit row (no secret in it); a crash leaves the old keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.audit import append_audit
from appliance.catalog import transaction
from appliance.vault import records
from appliance.vault.agent import AgentClient, Identity, agent_status, start_agent, unlock_serialized
from appliance.vault.errors import VaultError
from appliance.vault.keys import LocalKeys, disable_core_dumps
from appliance.vault.keyslots import KdfParams, hkdf_params, new_recovery_key, wrap_root

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.access import Session
    from appliance.vault.lifecycle import Credential


class RevocationError(VaultError):
    """A slot cannot be removed, or the vault cannot be re-keyed, as asked."""


@dataclass(frozen=True)
class RekeyResult:
    kek_version: int
    deks_rewrapped: int
    recovery_key: str
    """Shown once, never stored."""
    handover: dict[str, str]
    """Account -> one-time passphrase for its new slot: shown once, handed over, changed at once."""
    slot_ids: list[str]
    machine_key_file: Path | None
    warnings: list[str]
    """Steps after the commit that did not work (the re-key itself holds): each says what to do."""


def remove_slot(db: sqlite_utils.Database, home: Path, session: Session, slot_id: str) -> str:
    """Destroy a key slot. An account's slot disables the account. Returns what was removed, in words."""
    from appliance.vault import accounts

    found = {s["slot_id"]: s for s in records.slot_summaries(db)}
    if slot_id not in found:
        raise RevocationError(f"there is no key slot {slot_id!r}", hint="list the slots with `airlock vault status`")
    owner = accounts.for_slot(db, slot_id)
    if owner is not None:
        accounts.disable_user(db, session, owner.name)  # refuses the last admin; destroys the slot
        what = f"the slot of account {owner.name} ({owner.role}); the account is disabled"
    else:
        records.secure_delete(db)
        with transaction(db):
            records.delete_slot(db, slot_id)
            append_audit(db, "vault.remove_slot", slot_id, {"kind": found[slot_id]["kind"]}, actor=session.actor)
        records.checkpoint(db)
        what = f"the {found[slot_id]['kind']} slot {slot_id}"
    # A session opened with this slot by this OS user ends now (the agent checks on every request);
    # agents of other OS users notice within seconds (they poll the catalog).
    with contextlib.suppress(VaultError):
        agent_status(home)
    return what


def rekey(db: sqlite_utils.Database, home: Path, session: Session, credential: Credential, kdf: KdfParams, *,
          machine_key_file: Path, idle_timeout_s: int) -> RekeyResult:
    """Replace the root key and the KEK, re-wrap every DEK, re-create every slot (see the module docstring).

    `credential` must be the acting admin's own passphrase: the re-key re-creates their slot from it,
    and a leaked recovery key must not be able to lock the site out. The admin's session continues
    under the new root key (a new agent); every other session ends.
    """
    from appliance.vault import accounts
    from appliance.vault.lifecycle import open_root

    records.require_initialized(db)
    if session.role != "admin" or session.kind != "normal" or credential.kind != "passphrase":
        raise RevocationError("re-keying needs an admin logged in with their own account and passphrase",
                              hint="log in with `airlock vault unlock --user NAME` (an admin), then run "
                                   "`airlock vault rekey` (after break-glass access: reset an admin's passphrase "
                                   "first, `airlock vault passwd --recovery-key-file FILE --user NAME`)")
    disable_core_dumps()
    slot_used, old_root = open_root(db, credential, account=session.account)
    actor = accounts.for_slot(db, slot_used)
    if actor is None or actor.name != session.account or actor.role != "admin":
        raise RevocationError("that passphrase is not the logged-in admin's", hint="type your own passphrase")
    old_keys, new_keys = LocalKeys(old_root), LocalKeys(os.urandom(32))
    new_root = new_keys._root_key()
    del old_root
    had_machine = bool(records.slots(db, kind="machine"))
    machine_secret = os.urandom(32) if had_machine else None
    staged_machine = machine_key_file.with_name(machine_key_file.name + ".new")
    try:
        if machine_secret is not None:
            _write_private(staged_machine, machine_secret)
        recovery_secret, recovery_text = new_recovery_key()
        recovery_id = records.next_slot_id(db, "recovery")
        machine_id = records.next_slot_id(db, "machine")
        handover: dict[str, str] = {}
        records.secure_delete(db)
        with transaction(db):
            version = records.max_kek_version(db) + 1
            new_kek = new_keys.new_kek(version)
            records.insert_kek(db, version, new_kek)
            rewrapped = 0
            for record in records.deks(db):
                assert record.wrapped_dek is not None
                source = records.kek(db, record.kek_version)
                dek = old_keys.unwrap_dek(source.version, source.wrapped_kek, record.object_id, record.wrapped_dek)
                records.rewrap_dek(db, record.object_id, version,
                                   new_keys.wrap_dek(version, new_kek, record.object_id, dek))
                del dek
                rewrapped += 1
            retired = records.retire_keks_below(db, version)
            slots = []
            for account in accounts.all_accounts(db):
                if account.state != "active" or account.slot_id is None:
                    continue
                if account.name == session.account:
                    secret = credential.secret
                else:
                    handover[account.name] = new_recovery_key()[1]  # 256 random bits, readable groups
                    secret = handover[account.name].encode("utf-8")
                slot_kdf = dataclasses.replace(kdf, salt=os.urandom(16))
                records.replace_slot(db, wrap_root(new_root, slot_id=account.slot_id, kind="passphrase",
                                                   kdf=slot_kdf, secret=secret))
                db.execute("UPDATE users SET failed_unlocks = 0, locked_until = NULL WHERE name = ?",
                           [account.name])
                slots.append(account.slot_id)
            removed = [r["slot_id"] for r in records.slot_summaries(db) if r["slot_id"] not in slots]
            for slot_id in removed:
                records.delete_slot(db, slot_id)
            new_slots = [wrap_root(new_root, slot_id=recovery_id, kind="recovery", kdf=hkdf_params(),
                                   secret=recovery_secret)]
            if machine_secret is not None:
                new_slots.append(wrap_root(new_root, slot_id=machine_id, kind="machine", kdf=hkdf_params(),
                                           secret=machine_secret))
            for slot in new_slots:
                records.insert_slot(db, slot, session.actor)
                slots.append(slot.slot_id)
            append_audit(db, "vault.rekey", "vault", {
                "kek_version": version, "retired_versions": retired, "deks_rewrapped": rewrapped,
                "slots": slots, "slots_removed": removed, "kdf": kdf.describe(),
                "accounts_reenrolled": sorted(handover), "machine_key_file": str(machine_key_file)
                if machine_secret is not None else None}, actor=session.actor)
    except BaseException:
        with contextlib.suppress(OSError):
            staged_machine.unlink()
        old_keys.wipe()
        new_keys.wipe()
        raise
    # Committed. From here nothing may raise: the new recovery key and handover passphrases exist
    # only in this result, and the caller must get to show them.
    warnings = []
    with contextlib.suppress(Exception):  # a busy checkpoint is retried by the next one
        records.checkpoint(db)
    if machine_secret is not None:
        try:
            os.replace(staged_machine, machine_key_file)
        except OSError as exc:
            warnings.append(f"the new machine key is in {staged_machine} ({exc.strerror}): move it to "
                            f"{machine_key_file} by hand")
    # The admin's session goes on under the new root key; the old agent (old root) is ended.
    try:
        with unlock_serialized(home):
            with contextlib.suppress(VaultError):
                AgentClient(home).lock()
            identity = Identity(session.account, session.role, "normal", session.origin, slot_used)
            start_agent(home, new_root, records.require_initialized(db), idle_timeout_s, identity)
    except (VaultError, OSError):
        warnings.append("your session could not be restarted: log in again with `airlock vault unlock`")
    finally:
        old_keys.wipe()
        new_keys.wipe()
        del new_root
    return RekeyResult(version, rewrapped, recovery_text, handover, slots,
                       machine_key_file if machine_secret is not None else None, warnings)


def _write_private(path: Path, secret: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a leftover of an interrupted re-key: never a live key (that is `path` itself)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
        handle.flush()
        os.fsync(handle.fileno())
