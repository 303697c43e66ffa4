"""Revocation and re-keying (ADR 0012), each attack performed and shown to fail: real CLI, real
detached agents, real catalogs (an old backup copied with SQLite's backup API), real crypto."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from appliance.access import Session
from appliance.audit import iter_audit
from appliance.catalog import open_catalog
from appliance.vault import accounts, records, store
from appliance.vault.agent import AgentClient, agent_status
from appliance.vault.errors import UnlockError, VaultError, VaultLockedError
from appliance.vault.keys import LocalKeys
from appliance.vault.lifecycle import Credential, keys_for, open_root
from tests.appliance.vault.conftest import PASSPHRASE, _alive
from tests.conftest import BIN, REPO, run_cli

BOB, CAROL = "bob's own long passphrase", "carol audits everything carefully"
ADMIN_SESSION = Session("admin", "admin", "normal", "")


def _file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text + "\n")
    return path


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _agents_of(home: Path) -> list[int]:
    """Live key agents serving `home` (from /proc, so an orphan without a socket counts too)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if state != "Z" and b"appliance.vault.agent" in argv and str(home).encode() in argv:
            found.append(int(proc.name))
    return found


@pytest.fixture
def team(vault_init, unlock, passphrase_file: Path, tmp_path: Path):
    """admin (from init, with a machine slot), bob (operator), carol (auditor); the admin is logged in."""
    recovery = vault_init("--machine-key")
    unlock()
    for name, role, secret in (("bob", "operator", BOB), ("carol", "auditor", CAROL)):
        added = run_cli("users", "add", name, "--role", role, "--passphrase-file", str(_file(tmp_path, name, secret)),
                        "--admin-passphrase-file", str(passphrase_file))
        assert added.returncode == 0, added.stderr
    return {"recovery": _file(tmp_path, "recovery", recovery), "bob": tmp_path / "bob", "carol": tmp_path / "carol",
            "admin": passphrase_file}


def _login(unlock, name: str, secret_file: Path, expect_ok: bool = True):
    return unlock("--user", name, "--passphrase-file", str(secret_file), expect_ok=expect_ok)


# ------------------------------------------------------------------------------------------------ disable means out


def test_disabling_an_account_ends_its_running_session_at_once(team, unlock, airlock_home: Path) -> None:
    _login(unlock, "bob", team["bob"])
    bob_agent = agent_status(airlock_home)
    assert bob_agent is not None and bob_agent.account == "bob"
    db = open_catalog()
    client = keys_for(db, airlock_home)  # a job of bob's, holding a connection to the agent
    kek = records.active_kek(db)
    client.new_kek(kek.version + 1)  # works while bob is active

    # The admin disables bob from elsewhere (as another OS user would: nothing talks to bob's agent).
    accounts.disable_user(db, ADMIN_SESSION, "bob")
    with pytest.raises(VaultLockedError, match=r"session of bob ended \(the account bob was disabled"):
        client.new_kek(kek.version + 1)  # every key operation checks the account's state
    assert _wait_gone(bob_agent.pid), "bob's agent still runs (and holds the root key) after bob was disabled"
    assert agent_status(airlock_home) is None
    row = next(iter_audit(db, action="vault.lock"))
    assert row.details["reason"].startswith("session_revoked: the account bob was disabled")


def test_a_disabled_accounts_idle_agent_exits_without_any_request(team, unlock, airlock_home: Path) -> None:
    """The agent of another OS user is out of the admin's reach: it notices the catalog by itself."""
    _login(unlock, "carol", team["carol"])
    pid = agent_status(airlock_home).pid
    accounts.disable_user(open_catalog(), ADMIN_SESSION, "carol")
    started = time.monotonic()
    assert _wait_gone(pid, timeout=10.0)
    assert time.monotonic() - started < 6.0  # polls every 2 s; 3x margin for a loaded machine


def test_unlock_checks_the_passphrase_even_while_a_session_runs(team, unlock, airlock_home: Path,
                                                                 tmp_path: Path) -> None:
    running = agent_status(airlock_home)
    assert running is not None and running.account == "admin"
    wrong = _file(tmp_path, "wrong", "not the admin passphrase at all")
    refused = _login(unlock, "admin", wrong, expect_ok=False)
    assert refused.returncode == 2 and "that passphrase is not correct" in refused.stderr
    assert next(iter_audit(open_catalog(), action="vault.unlock_failed")).object == "admin"
    bad_machine = tmp_path / "machine.key"
    bad_machine.write_bytes(os.urandom(32))
    bad_machine.chmod(0o600)
    refused = unlock("--machine-key", "--machine-key-file", str(bad_machine), expect_ok=False)
    assert refused.returncode == 2 and "that machine key is not correct" in refused.stderr
    assert agent_status(airlock_home).pid == running.pid  # the real session is untouched
    again = _login(unlock, "admin", team["admin"])
    assert "vault unlocked for admin" in again.stdout


# ------------------------------------------------------------------------------------------------ removing slots


def test_removed_slots_open_nothing_and_the_last_admin_slot_stays(team, unlock, airlock_home: Path) -> None:
    status = json.loads(run_cli("vault", "status", "--json").stdout)
    assert {"machine-1", "recovery-1", "passphrase-1", "user-bob", "user-carol"} == {s["slot_id"]
                                                                                     for s in status["slots"]}
    # An operator may not remove slots (refused, audited).
    _login(unlock, "bob", team["bob"])
    refused = run_cli("vault", "remove-slot", "recovery-1", "--yes")
    assert refused.returncode == 2 and "needs the admin role; bob is operator" in refused.stderr
    _login(unlock, "admin", team["admin"])

    db = open_catalog()
    machine_key = records.slots(db, kind="machine")[0]
    key_file = airlock_home / "vault" / "machine.key"
    for slot_id in ("machine-1", "recovery-1"):
        removed = run_cli("vault", "remove-slot", slot_id, "--yes")
        assert removed.returncode == 0, removed.stderr
    with pytest.raises(UnlockError):
        open_root(db, Credential.machine(key_file))
    with pytest.raises(UnlockError):
        open_root(db, Credential.recovery(team["recovery"].read_text()))
    # The wrapped root of the removed slot is gone from the catalog's bytes (secure_delete + checkpoint).
    db.close()  # reading the files in this process would drop this connection's POSIX locks under it
    assert machine_key.wrapped_root not in b"".join(p.read_bytes() for p in airlock_home.glob("catalog.db*"))
    db = open_catalog()
    # A new slot never reuses a removed slot's id.
    added = run_cli("vault", "add-slot", "--kind", "recovery", "--passphrase-file", str(team["admin"]))
    assert "slot recovery-2 added" in added.stdout

    # An account's slot: removing it disables the account. The last admin's slot: refused.
    assert run_cli("vault", "remove-slot", "user-bob", "--yes").returncode == 0
    assert accounts.get(db, "bob").state == "disabled"
    last = run_cli("vault", "remove-slot", "passphrase-1", "--yes")
    assert last.returncode == 2 and "admin is the last admin account" in last.stderr
    assert accounts.get(db, "admin").state == "active"
    assert sorted(e.object for e in iter_audit(db, action="vault.remove_slot")) == ["machine-1", "recovery-1"]


# ------------------------------------------------------------------------------------------------ re-keying


def _backup(airlock_home: Path, where: Path) -> Path:
    where.mkdir()
    src, dst = sqlite3.connect(airlock_home / "catalog.db"), sqlite3.connect(where / "catalog.db")
    src.backup(dst)
    src.close()
    dst.close()
    return where


def test_rekey_old_backup_and_removed_secrets_open_nothing_written_after(team, unlock, airlock_home: Path,
                                                                         tmp_path: Path) -> None:
    db = open_catalog()
    keys = keys_for(db, airlock_home)
    store.create_object(db, keys, "before", "dataset")
    store.write_bytes(db, keys, airlock_home, "before", "shard", b"written before the re-key")
    old_machine_key = (airlock_home / "vault" / "machine.key").read_bytes()
    backup = _backup(airlock_home, tmp_path / "backup")  # the attacker's copy, taken now

    # bob leaves; the machine key is lost; then the admin re-keys.
    assert run_cli("users", "disable", "bob").returncode == 0
    assert run_cli("vault", "remove-slot", "machine-1", "--yes").returncode == 0
    rekeyed = run_cli("vault", "rekey", "--passphrase-file", str(team["admin"]))
    assert rekeyed.returncode == 0, rekeyed.stderr
    out = rekeyed.stdout
    # Two data keys: the object "before" and the audit anchor's seal key (ADR 0011), a vault object too.
    assert "new root key, KEK version 2, 2 data keys re-wrapped" in out
    carol_once = next(line.split(": ", 1)[1] for line in out.splitlines() if line.strip().startswith("carol: "))
    new_recovery = out.splitlines()[out.splitlines().index(
        "RECOVERY KEY (shown once; print it and keep it in the site's safe):") + 2].strip()
    assert "machine" not in " ".join(s["slot_id"] for s in json.loads(run_cli("vault", "status", "--json").stdout)
                                     ["slots"])  # removed before the re-key: not re-created
    assert carol_once not in str(next(iter_audit(db, action="vault.rekey")).details)

    # The admin's session goes on under the new root key; old data is still readable; new data is written.
    keys = keys_for(db, airlock_home)
    assert store.read_bytes(db, keys, airlock_home, "before", "shard") == b"written before the re-key"
    store.create_object(db, keys, "after", "dataset")
    store.write_bytes(db, keys, airlock_home, "after", "shard", b"written after the re-key")
    new_dek = records.dek(db, "after")
    new_kek = records.kek(db, new_dek.kek_version)

    # The attack: the backup + bob's old passphrase (or the old recovery or machine key) open the OLD root key...
    old_db = open_catalog(backup)
    _, old_root = open_root(old_db, Credential.passphrase(BOB), account="bob")
    for secret in (Credential.recovery(team["recovery"].read_text()), Credential("machine", old_machine_key)):
        assert open_root(old_db, secret)[1] == old_root
    old_kek = records.active_kek(old_db)
    attacker = LocalKeys(old_root)
    # ...which opens nothing written after the re-key: not the current KEK, nor (with the old KEK) the new DEK.
    with pytest.raises(VaultError, match="does not unwrap"):
        attacker.unwrap_dek(new_kek.version, new_kek.wrapped_kek, "after", new_dek.wrapped_dek)
    with pytest.raises(VaultError, match="does not unwrap"):
        attacker.unwrap_dek(old_kek.version, old_kek.wrapped_kek, "after", new_dek.wrapped_dek)
    with pytest.raises(VaultError, match="does not unwrap"):
        store.read_bytes(db, attacker, airlock_home, "after", "shard")
    # The old secrets open no current slot either.
    for credential in (Credential.passphrase(BOB), Credential.passphrase(CAROL),
                       Credential.recovery(team["recovery"].read_text()), Credential("machine", old_machine_key)):
        with pytest.raises(UnlockError):
            open_root(db, credential)

    # The new secrets do: carol with her one-time passphrase, the new recovery key; the admin's own is kept.
    assert accounts.for_slot(db, open_root(db, Credential.passphrase(carol_once), account="carol")[0]).name == "carol"
    assert open_root(db, Credential.recovery(new_recovery))[0] == "recovery-2"
    assert open_root(db, Credential.passphrase(PASSPHRASE), account="admin")[0] == "passphrase-1"
    # The old KEK's wrapped bytes are gone from the current catalog.
    db.close()
    old_db.close()
    assert old_kek.wrapped_kek not in b"".join(p.read_bytes() for p in airlock_home.glob("catalog.db*"))


def test_rekey_kills_other_sessions_and_recreates_the_machine_slot(team, unlock, airlock_home: Path) -> None:
    old_key = (airlock_home / "vault" / "machine.key").read_bytes()
    admin_pid = agent_status(airlock_home).pid
    rekeyed = run_cli("vault", "rekey", "--passphrase-file", str(team["admin"]))
    assert rekeyed.returncode == 0, rekeyed.stderr
    assert "new machine key file" in rekeyed.stdout
    assert _wait_gone(admin_pid)  # the agent holding the old root key is gone...
    running = agent_status(airlock_home)
    assert running is not None and running.account == "admin" and running.pid != admin_pid  # ...a new one serves
    key_file = airlock_home / "vault" / "machine.key"
    assert key_file.read_bytes() != old_key and oct(key_file.stat().st_mode & 0o777) == "0o600"
    db = open_catalog()
    assert open_root(db, Credential.machine(key_file))[0] == "machine-2"
    with pytest.raises(UnlockError):  # the lost (old) machine key opens nothing current
        open_root(db, Credential("machine", old_key))
    refused = run_cli("vault", "rekey", "--passphrase-file", str(team["bob"]))
    assert refused.returncode == 2  # someone else's passphrase does not re-key


def test_only_an_admin_rekeys(team, unlock) -> None:
    _login(unlock, "bob", team["bob"])
    refused = run_cli("vault", "rekey", "--passphrase-file", str(team["bob"]))
    assert refused.returncode == 2 and "needs the admin role; bob is operator" in refused.stderr


# ------------------------------------------------------------------------------------------------ one agent only


def test_two_racing_unlocks_leave_exactly_one_agent_and_lock_kills_it(vault_init, passphrase_file: Path,
                                                                      airlock_home: Path, agents) -> None:
    vault_init()
    racers = [subprocess.Popen([str(BIN / "airlock"), "vault", "unlock", "--passphrase-file", str(passphrase_file)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO) for _ in range(3)]
    for racer in racers:
        racer.wait(timeout=120)
    alive = _agents_of(airlock_home)
    agents.extend(alive)  # killed by the fixture whatever happens
    assert len(alive) == 1, f"{len(alive)} agents hold the root key"
    assert [r.returncode for r in racers] == [0, 0, 0]
    assert agent_status(airlock_home).pid == alive[0]
    assert run_cli("vault", "lock").returncode == 0
    assert _wait_gone(alive[0]) and _agents_of(airlock_home) == []


def test_a_second_agent_refuses_to_run_beside_the_first(vault_init, unlock, airlock_home: Path) -> None:
    """Even started by hand, past `vault unlock`'s own lock: the agent's instance lock holds."""
    import sys

    vault_init()
    unlock()
    first = agent_status(airlock_home)
    from appliance.vault.agent import socket_path

    stray = subprocess.run([sys.executable, "-m", "appliance.vault.agent", "--home", str(airlock_home), "--socket",
                            str(socket_path(airlock_home)), "--vault-id", first.vault_id],
                           input=os.urandom(32), capture_output=True, timeout=60, cwd="/")
    assert stray.returncode == 3 and b"ready" not in stray.stdout
    # The first agent still owns the socket: the refused one never touched it.
    assert AgentClient(airlock_home).status().pid == first.pid


def test_the_session_check_ends_on_a_missing_catalog_and_refuses_on_an_unreadable_one(tmp_path: Path) -> None:
    from appliance.vault.agent import UNKNOWN, Identity, session_revoked

    keys, bob = LocalKeys(os.urandom(32)), Identity("bob", "operator", "normal", "", "user-bob")
    assert session_revoked(tmp_path, keys, bob) == "the catalog is gone"
    (tmp_path / "catalog.db").write_bytes(b"not a database at all " * 100)
    assert session_revoked(tmp_path, keys, bob) == UNKNOWN  # refused now, asked again later; not a logout
