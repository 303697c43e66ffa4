"""The audit anchor's seal key, kept in the vault (docs/adr/0011-anchored-audit-chain.md).

The key is the data key of the reserved vault object `audit-anchor` (kind `audit`), run through
HKDF-SHA256 with its own label, so it is wrapped like every other DEK: rotation and re-keying
re-wrap it, a stolen catalog or backup without a credential cannot unwrap it, and nobody
without an unlocked vault can seal a forged head. The object is created by the first unlocked
process that needs it. It is never crypto-shredded (`store.delete_object` refuses the kind).

`register()` (called at a command's entry) hands `key_from_session` to `appliance.audit`, which
asks for the key once per process and never talks to the key agent itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils

OBJECT_ID = "audit-anchor"
KIND = "audit"
_HKDF_INFO = b"airlock audit anchor seal v1"


def derive_seal_key(dek: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(dek)


def seal_key(db: sqlite_utils.Database, keys) -> bytes:
    """The seal key, creating the `audit-anchor` object first when the vault has none yet."""
    import secrets

    from appliance.audit import append_audit
    from appliance.catalog import transaction
    from appliance.vault import records
    from appliance.vault.errors import ObjectError

    try:
        record = records.dek(db, OBJECT_ID)
    except ObjectError:
        with transaction(db):
            if db.execute("SELECT 1 FROM vault_deks WHERE object_id = ?", [OBJECT_ID]).fetchone() is None:
                # Not `store.create_object`: this is the audit's key, not a data object, and its row
                # says so (`vault.` lists and object counts stay about data).
                kek = records.active_kek(db)
                _, wrapped = keys.new_dek(kek.version, kek.wrapped_kek, OBJECT_ID)
                dek_id = secrets.token_hex(16)
                records.insert_dek(db, OBJECT_ID, KIND, dek_id, kek.version, wrapped)
                append_audit(db, "audit.seal_key_created", OBJECT_ID, {"dek_id": dek_id, "kek_version": kek.version})
        record = records.dek(db, OBJECT_ID)
    if record.wrapped_dek is None:
        raise ObjectError("the audit anchor's key object was destroyed",
                          hint="restore the catalog from a backup; `audit verify` cannot check seals without it")
    kek = records.kek(db, record.kek_version)
    return derive_seal_key(keys.unwrap_dek(kek.version, kek.wrapped_kek, OBJECT_ID, record.wrapped_dek))


def key_from_session(db: sqlite_utils.Database) -> bytes | None:
    """The seal key through the running key agent, or None (no vault, locked, or any key error)."""
    from appliance.paths import airlock_home
    from appliance.vault import records
    from appliance.vault.agent import AgentClient, agent_status
    from appliance.vault.errors import VaultError

    try:
        vault_id = records.vault_id(db)
        if vault_id is None:
            return None
        home = airlock_home()
        if agent_status(home) is None:
            return None
        return seal_key(db, AgentClient(home, expected_vault_id=vault_id))
    except VaultError:
        return None


def register() -> None:
    from appliance.audit import set_anchor_key_provider

    set_anchor_key_provider(key_from_session)
