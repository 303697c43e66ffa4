"""Training checkpoints in the vault: encrypted, written atomically, one object per run.

A checkpoint holds adapter weights trained on customer data, so it is customer data: it is
stored as a vault object (kind `checkpoint`) and never touches the disk in plaintext.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from appliance.vault import records, store
from appliance.vault.errors import ObjectError

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.vault.keys import KeyOps


class VaultCheckpoints:
    """`CheckpointStore` over the vault object `object_id` (created on first use)."""

    def __init__(self, db: sqlite_utils.Database, keys: KeyOps, home: Path, object_id: str) -> None:
        self.db, self.keys, self.home, self.object_id = db, keys, home, object_id

    def _ensure_object(self) -> None:
        try:
            records.dek(self.db, self.object_id)
        except ObjectError:
            store.create_object(self.db, self.keys, self.object_id, "checkpoint")

    def write_bytes(self, name: str, data: bytes) -> None:
        self._ensure_object()
        store.write_bytes(self.db, self.keys, self.home, self.object_id, name, data, overwrite=True)

    def read_bytes(self, name: str) -> bytes | None:
        if name not in store.list_files(self.home, self.object_id):
            return None
        return store.read_bytes(self.db, self.keys, self.home, self.object_id, name)
