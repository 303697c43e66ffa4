"""The site secret behind every keyed pseudonym: DICOM UID remapping, patient pseudonyms, date offsets.

32 random bytes, created at the first import and kept in the vault (object `site-deid-secret`),
so pseudonyms stay consistent across studies and re-imports on this appliance while nobody
without the vault's keys can reverse them. It is never printed, logged or exported.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.vault.errors import ObjectError

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.vault.keys import KeyOps

OBJECT_ID = "site-deid-secret"
FILE_NAME = "secret"
SIZE = 32


def site_secret(db: sqlite_utils.Database, keys: KeyOps, home: Path) -> bytes:
    """The site secret, created on first use (safe against a crash between creating and writing it)."""
    from appliance.vault import records
    from appliance.vault.store import create_object, file_path, read_bytes, write_bytes

    try:
        records.dek(db, OBJECT_ID)
    except ObjectError:
        try:
            create_object(db, keys, OBJECT_ID, "secret")
        except ObjectError:
            pass  # another import created it a moment ago
    if not file_path(home, OBJECT_ID, FILE_NAME).exists():
        try:
            write_bytes(db, keys, home, OBJECT_ID, FILE_NAME, secrets.token_bytes(SIZE))
        except ObjectError:
            pass  # written concurrently: read what is there
    value = read_bytes(db, keys, home, OBJECT_ID, FILE_NAME)
    if len(value) != SIZE:
        raise ObjectError("the site de-identification secret is damaged",
                          hint="restore the vault from a backup; a new secret would change every pseudonym")
    return value
