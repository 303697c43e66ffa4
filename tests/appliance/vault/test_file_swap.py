"""Attack (issue 20, item 7): an encrypted file that gets overwritten (an artifact rewritten by a
retried job or an optimize stage) is swapped back for an older ciphertext of the same object and
name. Same key, same associated data: it authenticates, so the vault also holds each file to the
digest it recorded when it last wrote it."""

from __future__ import annotations

import shutil

import pytest

from appliance.audit import iter_audit
from appliance.catalog import open_catalog
from appliance.vault import records, store
from appliance.vault.errors import StreamError
from appliance.vault.keys import LocalKeys
from appliance.vault.keyslots import passphrase_kdf
from appliance.vault.lifecycle import Credential, init_vault, open_root


def test_an_older_ciphertext_of_an_overwritten_file_is_refused(airlock_home, tmp_path):
    db = open_catalog()
    result = init_vault(db, "correct horse battery staple", passphrase_kdf())
    keys = LocalKeys(open_root(db, Credential.recovery(result.recovery_key))[1])
    store.create_object(db, keys, "run-1", "model")
    path = store.write_bytes(db, keys, airlock_home, "run-1", "adapter", b"weights v1 (withdrawn: memorized PHI)")
    shutil.copy2(path, tmp_path / "old.alv")  # the attacker keeps the old ciphertext
    store.write_bytes(db, keys, airlock_home, "run-1", "adapter", b"weights v2", overwrite=True)
    assert store.read_bytes(db, keys, airlock_home, "run-1", "adapter") == b"weights v2"

    shutil.copy2(tmp_path / "old.alv", path)  # ... and puts it back
    with pytest.raises(StreamError, match="is not the file the vault last wrote for run-1/adapter"):
        store.read_bytes(db, keys, airlock_home, "run-1", "adapter")
    assert [e.details["file"] for e in iter_audit(db, action="vault.read_failed")] == ["adapter"]
    report = store.verify_files(db, keys, airlock_home)
    assert not report.ok and "not the file the vault last wrote" in report.files[0].error

    # The digest is the ciphertext's, recorded in the catalog and in the audit row of the write.
    [_, last_write] = list(iter_audit(db, action="vault.write"))
    assert last_write.details["sha256"] == records.file_digest(db, "run-1", "adapter")
    # Shredding forgets the digests with the key.
    store.delete_object(db, airlock_home, "run-1")
    assert records.file_digest(db, "run-1", "adapter") is None
