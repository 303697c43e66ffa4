"""Data fixtures: an initialized vault whose root key this process holds (LocalKeys), and the
CLI fixtures of the vault tests (fast KDF, init, unlock with a real agent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.appliance.vault.conftest import agents, fast_kdf, passphrase_file, unlock, vault_init  # noqa: F401

PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def vault(airlock_home: Path, fast_kdf):  # noqa: F811 - the fixture imported above
    """(db, keys, home): a fresh vault and its root key held in this process."""
    from appliance.catalog import open_catalog
    from appliance.vault.keys import LocalKeys
    from appliance.vault.keyslots import passphrase_kdf
    from appliance.vault.lifecycle import Credential, init_vault, open_root

    db = open_catalog()
    init_vault(db, PASSPHRASE, passphrase_kdf())
    _, root = open_root(db, Credential.passphrase(PASSPHRASE))
    return db, LocalKeys(root), airlock_home
