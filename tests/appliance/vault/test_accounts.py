"""Accounts and roles through the real CLI: own key slots, role refusals (audited), disabling,
lockout, the actor of jobs, break-glass access. Real agents, real slots, real catalog."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

BOB, CAROL = "bob's own long passphrase", "carol audits everything carefully"


def _file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text + "\n")
    return path


def _audit(action: str) -> list[dict]:
    result = run_cli("audit", "show", "--action", action, "--limit", "500", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["entries"]


@pytest.fixture
def team(vault_init, unlock, passphrase_file: Path, tmp_path: Path):
    """admin (from init), bob (operator), carol (auditor); the admin is logged in."""
    recovery = vault_init()
    unlock()
    for name, role, secret in (("bob", "operator", BOB), ("carol", "auditor", CAROL)):
        added = run_cli("users", "add", name, "--role", role, "--passphrase-file", str(_file(tmp_path, name, secret)),
                        "--admin-passphrase-file", str(passphrase_file))
        assert added.returncode == 0, added.stderr
    return {"recovery": recovery, "bob": tmp_path / "bob", "carol": tmp_path / "carol", "admin": passphrase_file}


def _login(unlock, name: str, secret_file: Path, expect_ok: bool = True):
    return unlock("--user", name, "--passphrase-file", str(secret_file), expect_ok=expect_ok)


def test_first_account_is_admin_and_others_get_their_own_slots(team) -> None:
    users = {u["name"]: u for u in json.loads(run_cli("users", "list", "--json").stdout)["users"]}
    assert {n: u["role"] for n, u in users.items()} == {"admin": "admin", "bob": "operator", "carol": "auditor"}
    slots = {s["slot_id"] for s in json.loads(run_cli("vault", "status", "--json").stdout)["slots"]}
    assert {"passphrase-1", "user-bob", "user-carol"} <= slots
    assert [e["object"] for e in _audit("user.add")] == ["carol", "bob"]


def test_an_operator_cannot_delete_add_users_or_rotate_and_refusals_are_audited(team, unlock, tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text('{"text": "press 4: hydraulic leak fixed, seal replaced"}\n')
    _login(unlock, "bob", team["bob"])
    assert json.loads(run_cli("vault", "status", "--json").stdout)["account"] == "bob"
    imported = run_cli("data", "import", str(src), "--name", "logs")
    assert imported.returncode == 0, imported.stderr
    for command in (["data", "delete", "logs", "--yes"], ["vault", "rotate"],
                    ["users", "add", "eve", "--role", "admin", "--passphrase-file", str(team["bob"]),
                     "--admin-passphrase-file", str(team["bob"])]):
        refused = run_cli(*command)
        assert refused.returncode == 2, command
        assert "needs the admin role; bob is operator" in refused.stderr
    denied = _audit("access.denied")
    assert [e["object"] for e in denied] == ["users.manage", "vault.rotate", "data.delete"]
    assert all(e["actor"].startswith("bob (os:") for e in denied)
    # The job bob started, and everything it wrote, is on bob's name.
    job_rows = [e for e in _audit("job.") if e["details"].get("kind") == "data_import"]
    assert job_rows and all(e["actor"].startswith("bob") for e in job_rows)
    assert _audit("data.import")[0]["actor"].startswith("bob")


def test_an_auditor_cannot_export_or_decrypt(team, unlock, tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text('{"text": "line 2 conveyor belt tension adjusted"}\n')
    assert run_cli("data", "import", str(src), "--name", "logs").returncode == 0
    _login(unlock, "carol", team["carol"])
    for command in (["data", "export", "logs", "--out", str(tmp_path / "out")], ["vault", "verify"],
                    ["data", "import", str(src), "--name", "logs"]):
        refused = run_cli(*command)
        assert refused.returncode == 2 and "carol is auditor" in refused.stderr, command
    assert not (tmp_path / "out").exists()
    assert run_cli("audit", "verify").returncode == 0
    assert run_cli("data", "report", "logs").returncode == 0  # reports are for auditors


def test_a_disabled_account_no_longer_unlocks_while_others_still_do(team, unlock) -> None:
    assert run_cli("users", "disable", "bob").returncode == 0
    failed = _login(unlock, "bob", team["bob"], expect_ok=False)
    assert failed.returncode == 2 and "disabled" in failed.stderr
    assert "user-bob" not in {s["slot_id"] for s in json.loads(run_cli("vault", "status", "--json").stdout)["slots"]}
    _login(unlock, "carol", team["carol"])
    _login(unlock, "admin", team["admin"])
    last_admin = run_cli("users", "disable", "admin")
    assert last_admin.returncode == 2 and "last admin" in last_admin.stderr


def test_lockout_after_five_wrong_passphrases_is_audited(team, unlock, tmp_path) -> None:
    wrong = _file(tmp_path, "wrong", "not carol's passphrase at all")
    for _ in range(5):
        assert _login(unlock, "carol", wrong, expect_ok=False).returncode == 2
    locked = _login(unlock, "carol", team["carol"], expect_ok=False)  # even the right one, for now
    assert locked.returncode == 2 and "locked after 5 failed unlocks" in locked.stderr
    assert _audit("user.locked")[0]["object"] == "carol"
    assert len([e for e in _audit("vault.unlock_failed") if e["object"] == "carol"]) == 5
    carol = next(u for u in json.loads(run_cli("users", "list", "--json").stdout)["users"] if u["name"] == "carol")
    assert carol["failed_unlocks"] == 5 and carol["locked_until"]
    _login(unlock, "bob", team["bob"])  # other accounts are unaffected


def test_recovery_unlock_is_break_glass_until_an_admin_acknowledges(team, unlock, tmp_path) -> None:
    recovery = _file(tmp_path, "recovery", team["recovery"])
    unlocked = unlock("--recovery-key-file", str(recovery))
    assert "EMERGENCY ACCESS" in unlocked.stderr
    status = json.loads(run_cli("vault", "status", "--json").stdout)
    assert (status["account"], status["role"], status["session"]) == ("break-glass", "admin", "emergency")
    pending = status["emergencies_pending"]
    assert len(pending) == 1
    row = _audit("vault.unlock")[0]
    assert row["details"]["emergency"] is True and row["actor"].startswith("break-glass [emergency]")
    assert "EMERGENCY ACCESS #1" in run_cli("vault", "status").stdout
    own = run_cli("users", "ack-emergency", "1", "--note", "forgot passphrase")
    assert own.returncode == 2 and "cannot acknowledge itself" in own.stderr

    _login(unlock, "admin", team["admin"])
    assert run_cli("users", "ack-emergency", "1", "--note", "night shift lost the passphrase").returncode == 0
    assert json.loads(run_cli("vault", "status", "--json").stdout)["emergencies_pending"] == []
    assert _audit("emergency.acknowledge")[0]["actor"].startswith("admin")


def test_a_vault_from_before_accounts_gets_an_admin_account(airlock_home: Path) -> None:
    from appliance.catalog import MIGRATIONS, migrate_catalog, open_catalog, transaction

    db = open_catalog(migrate=False)
    with transaction(db):
        db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT)")
        for version, migration in enumerate(MIGRATIONS[:5], start=1):
            migration(db)
            db.execute("INSERT INTO schema_version VALUES (?, 'before accounts')", [version])
        db.execute("INSERT INTO vault_key_slots VALUES ('passphrase-1', 'passphrase', '{}', x'00', 't', 'os:root')")
    migrate_catalog(db)
    assert db.execute("SELECT name, role, slot_id, state FROM users").fetchall() == \
        [("admin", "admin", "passphrase-1", "active")]
