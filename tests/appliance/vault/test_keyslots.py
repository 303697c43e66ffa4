"""Key slots and the KEK/DEK hierarchy, in process (no agent): real Argon2id/scrypt/HKDF, real AES-GCM."""

from __future__ import annotations

import dataclasses
import os

import pytest

from appliance.vault import keyslots
from appliance.vault.errors import VaultError
from appliance.vault.keys import LocalKeys
from appliance.vault.keyslots import (
    KdfParams,
    hkdf_params,
    new_recovery_key,
    parse_recovery_key,
    passphrase_kdf,
    read_machine_key,
    unwrap_root,
    wrap_root,
)

ROOT = os.urandom(32)


def test_default_passphrase_parameters_are_the_documented_ones():
    # Checked by value, not run: a default derive takes ~1 s by design (the bench measures it).
    assert 256 <= keyslots.DEFAULT_MEMORY_MIB <= keyslots.MAX_DEFAULT_MEMORY_MIB <= 1024
    assert keyslots.DEFAULT_LANES == 4
    assert keyslots.TARGET_UNLOCK_SECONDS == 1.0
    assert keyslots.SCRYPT_DEFAULT == {"n": 1 << 18, "r": 8, "p": 1}  # 256 MiB
    assert keyslots.argon2id_available()


def test_test_profile_applies_only_when_asked(monkeypatch):
    assert passphrase_kdf().memory_kib == 8 * 1024  # the fixture set AIRLOCK_KDF_PROFILE=test
    assert passphrase_kdf(memory_mib=16).memory_kib == 16 * 1024
    monkeypatch.delenv("AIRLOCK_KDF_PROFILE")
    assert passphrase_kdf(memory_mib=16, kdf="scrypt").n == 16384
    assert passphrase_kdf(memory_mib=24, kdf="scrypt").n == 16384  # rounded down to a power of two


@pytest.mark.parametrize("name", ["argon2id", "scrypt", "hkdf"])
def test_slot_round_trip_and_wrong_secret(name):
    kdf = hkdf_params() if name == "hkdf" else passphrase_kdf(kdf=name)
    slot = wrap_root(ROOT, slot_id="passphrase-1", kind="passphrase", kdf=kdf, secret=b"right secret")
    assert unwrap_root(slot, b"right secret") == ROOT
    assert unwrap_root(slot, b"wrong secret") is None
    assert ROOT not in slot.wrapped_root


def test_tampered_slot_does_not_open():
    slot = wrap_root(ROOT, slot_id="passphrase-1", kind="passphrase", kdf=passphrase_kdf(), secret=b"s")
    flipped = bytearray(slot.wrapped_root)
    flipped[20] ^= 1
    assert unwrap_root(dataclasses.replace(slot, wrapped_root=bytes(flipped)), b"s") is None
    assert unwrap_root(dataclasses.replace(slot, wrapped_root=slot.wrapped_root[:-1]), b"s") is None
    # The KDF parameters and the slot id are bound as associated data: weakening them breaks the slot.
    weaker = dataclasses.replace(slot.kdf, iterations=slot.kdf.iterations + 1)
    assert unwrap_root(dataclasses.replace(slot, kdf=weaker), b"s") is None
    assert unwrap_root(dataclasses.replace(slot, slot_id="passphrase-2"), b"s") is None


@pytest.mark.parametrize("field", [{"memory_kib": 1 << 40}, {"iterations": 10_000}, {"n": 1 << 30}, {"lanes": -1}])
def test_slot_parameters_are_capped(field):
    data = {**passphrase_kdf().to_dict(), **field}
    with pytest.raises(ValueError, match="outside"):
        KdfParams.from_dict(data)


def test_recovery_key_is_grouped_base32_and_parses_leniently():
    secret, text = new_recovery_key()
    groups = text.split("-")
    assert len(groups) == 13 and all(len(g) == 4 for g in groups)
    assert parse_recovery_key(text) == secret
    assert parse_recovery_key(" " + text.lower().replace("-", " ") + "\n") == secret
    assert parse_recovery_key("not a key") == b""


def test_machine_key_file_must_be_private(tmp_path):
    path = tmp_path / "machine.key"
    secret = keyslots.create_machine_key(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert read_machine_key(path) == secret
    path.chmod(0o640)
    with pytest.raises(VaultError, match=r"machine\.key must be owned by this account and mode 0600"):
        read_machine_key(path)
    with pytest.raises(VaultError, match="already exists"):
        keyslots.create_machine_key(path)


def test_dek_is_bound_to_object_and_kek_version():
    keys = LocalKeys(ROOT)
    kek1 = keys.new_kek(1)
    dek, wrapped = keys.new_dek(1, kek1, "dataset-a")
    assert keys.unwrap_dek(1, kek1, "dataset-a", wrapped) == dek
    with pytest.raises(VaultError, match="data key of object dataset-b does not unwrap"):
        keys.unwrap_dek(1, kek1, "dataset-b", wrapped)
    with pytest.raises(VaultError, match="KEK version 2 does not unwrap"):
        keys.unwrap_dek(2, kek1, "dataset-a", wrapped)
    kek2 = keys.new_kek(2)
    rewrapped = keys.rewrap_dek(1, kek1, 2, kek2, "dataset-a", wrapped)
    assert keys.unwrap_dek(2, kek2, "dataset-a", rewrapped) == dek
    with pytest.raises(VaultError, match="does not unwrap"):
        LocalKeys(os.urandom(32)).unwrap_dek(2, kek2, "dataset-a", rewrapped)
    keys.wipe()
    with pytest.raises(VaultError, match="wiped"):
        keys.new_kek(3)


def _installed_copy(tmp_path):
    """The packages as an installed appliance has them: no pyproject.toml beside them (not a checkout)."""
    import shutil

    from tests.conftest import REPO

    root = tmp_path / "site-packages"
    for package in ("appliance", "bundler"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_test_kdf_profile_is_refused_on_an_installed_appliance(tmp_path, airlock_home):
    """AIRLOCK_KDF_PROFILE=test left in an installed appliance's environment must not give 8 MiB slots."""
    import subprocess
    import sys

    root = _installed_copy(tmp_path)
    secret = tmp_path / "passphrase.txt"
    secret.write_text("correct horse battery staple\n")
    env = {**os.environ, "PYTHONPATH": str(root), "AIRLOCK_KDF_PROFILE": "test", "AIRLOCK_HOME": str(airlock_home)}
    init = subprocess.run([sys.executable, "-c", "import sys; from appliance.cli import main; sys.exit(main())",
                           "vault", "init", "--passphrase-file", str(secret)],
                          capture_output=True, text=True, env=env, cwd=root, timeout=120, check=False)
    assert init.returncode == 2, init.stdout + init.stderr
    assert "AIRLOCK_KDF_PROFILE=test (tiny, guessable KDF parameters for the test suite) is refused" in init.stderr
    assert "hint: unset AIRLOCK_KDF_PROFILE" in init.stderr
    from appliance.catalog import open_catalog
    from appliance.vault.records import vault_id

    assert not (airlock_home / "catalog.db").exists() or vault_id(open_catalog(airlock_home)) is None


def test_the_test_kdf_profile_is_honoured_only_in_a_checkout_and_only_as_test(monkeypatch):
    assert keyslots.test_profile_requested()  # this checkout, the fixture's AIRLOCK_KDF_PROFILE=test
    monkeypatch.setenv("AIRLOCK_KDF_PROFILE", "fast")
    with pytest.raises(VaultError, match="'fast' is not a KDF profile"):
        passphrase_kdf()
    monkeypatch.setenv("AIRLOCK_HOME", "/var/lib/airlock")
    monkeypatch.setenv("AIRLOCK_KDF_PROFILE", "test")
    with pytest.raises(VaultError, match="refused on an installed appliance"):
        passphrase_kdf()


def test_doctor_flags_weak_passphrase_slots(airlock_home):
    """A vault made with the test profile: doctor names the weak slot (a warning: it must not block upgrades)."""
    from appliance.catalog import open_catalog
    from appliance.doctor import check_key_slots
    from appliance.vault.lifecycle import init_vault

    airlock_home.mkdir()
    init_vault(open_catalog(airlock_home), "correct horse battery staple", passphrase_kdf())
    (weak,) = check_key_slots(airlock_home)
    assert weak.status == "warn" and "passphrase-1 (argon2id, 8 MiB)" in weak.detail
    assert "airlock users passwd" in weak.hint
    strong = dataclasses.replace(passphrase_kdf(), memory_kib=256 * 1024)
    assert not keyslots.is_weak(strong) and keyslots.is_weak(passphrase_kdf(memory_mib=16))
    assert not keyslots.is_weak(dataclasses.replace(passphrase_kdf(kdf="scrypt"), n=1 << 18))
