"""Attacks on the audit tail (issue 20, item 3): cutting rows, look-alike triggers, a rewritten
chain with a rewritten anchor. Each is performed with a real second SQLite connection (an
insider's sqlite3 CLI) and `verify` (or `airlock audit verify`) must report it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from appliance.audit import (
    GENESIS_HASH,
    append_audit,
    compute_entry_hash,
    iter_audit,
    set_anchor_key_provider,
    verify_chain,
)
from appliance.catalog import open_catalog
from tests.conftest import run_cli

ORIGINAL_TRIGGERS = (
    "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log\n"
    "        BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;\n"
    "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log\n"
    "        BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;")
NOOP_TRIGGERS = ("CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log BEGIN SELECT 1; END;"
                 "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log BEGIN SELECT 1; END;")


@pytest.fixture(autouse=True)
def no_seal_provider():
    set_anchor_key_provider(None)
    yield
    set_anchor_key_provider(None)


def _chain(n: int):
    db = open_catalog()
    for i in range(1, n + 1):
        append_audit(db, "test.event", f"object-{i}", {"i": i})
    return db


def _insider(home: Path, sql: str) -> None:
    conn = sqlite3.connect(home / "catalog.db")
    conn.executescript("DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete; " + sql)
    conn.close()


def test_cut_tail_behind_identical_triggers_is_reported_with_the_anchor(airlock_home):
    """The issue's attack: drop the triggers, delete the last rows, recreate the triggers."""
    _chain(6).close()
    _insider(airlock_home, "DELETE FROM audit_log WHERE seq >= 5; " + ORIGINAL_TRIGGERS)
    report = verify_chain(open_catalog())
    assert not report.ok and report.first_broken_seq == 5
    assert "recorded seq 6 (rows cut off the end)" in report.reason
    assert report.anchor is not None and report.anchor.last_seq == 6
    result = run_cli("audit", "verify")
    assert result.returncode == 1
    assert "rows cut off the end" in result.stderr
    assert f"checked against anchor {airlock_home / 'audit-anchor.log'}: 6 heads" in result.stderr


def test_noop_triggers_with_the_same_names_are_reported(airlock_home):
    _chain(3).close()
    _insider(airlock_home, NOOP_TRIGGERS)
    report = verify_chain(open_catalog())
    assert not report.ok
    assert "triggers on audit_log differ" in report.reason and "audit_log_no_delete" in report.reason
    # and they really are no-ops: the insider can now delete without an error
    conn = sqlite3.connect(airlock_home / "catalog.db")
    conn.execute("DELETE FROM audit_log WHERE seq = 3")
    conn.commit()
    conn.close()
    assert "rows cut off" in verify_chain(open_catalog()).reason


def test_an_added_trigger_that_swallows_rows_is_reported(airlock_home):
    db = _chain(2)
    conn = sqlite3.connect(airlock_home / "catalog.db")
    conn.execute("CREATE TRIGGER hide_exports BEFORE INSERT ON audit_log WHEN NEW.action = 'data.export'"
                 " BEGIN SELECT RAISE(IGNORE); END")
    conn.close()
    append_audit(db, "data.export", "dataset-1", {})  # silently dropped by the planted trigger
    append_audit(db, "test.event", "after", {})
    report = verify_chain(db)
    assert not report.ok
    # The swallowed row's head reached the anchor (it was "committed"), the chain never saw it.
    assert "anchor file recorded" in report.reason or "differ" in report.reason


def test_a_rolled_back_row_leaves_no_anchored_head(airlock_home):
    from appliance.catalog import transaction

    db = _chain(2)
    with pytest.raises(RuntimeError), transaction(db):
        append_audit(db, "test.event", "rolled-back", {})
        raise RuntimeError("the change failed")
    append_audit(db, "test.event", "after", {})
    report = verify_chain(db)
    assert report.ok, report.reason
    assert report.anchor is not None and (report.anchor.heads, report.anchor.last_seq) == (3, 3)


def test_a_deleted_anchor_file_is_reported(airlock_home):
    _chain(2).close()
    (airlock_home / "audit-anchor.log").unlink()
    report = verify_chain(open_catalog())
    assert not report.ok and "anchor file" in report.reason and "missing" in report.reason


def test_an_edited_anchor_line_is_reported(airlock_home):
    _chain(2).close()
    path = airlock_home / "audit-anchor.log"
    path.write_text(path.read_text().replace("v1 2 ", "v1 2 x"))
    assert "malformed" in verify_chain(open_catalog()).reason


def _unlocked_vault(db):
    from appliance.vault.keys import LocalKeys
    from appliance.vault.keyslots import passphrase_kdf
    from appliance.vault.lifecycle import Credential, init_vault, open_root

    result = init_vault(db, "correct horse battery staple", passphrase_kdf())
    _, root = open_root(db, Credential.recovery(result.recovery_key))
    return LocalKeys(root)


def _rewrite_without_row(home: Path, drop_seq: int) -> None:
    """An insider who knows the hash function: remove a row and recompute every later hash, then
    rewrite the anchor file to match, keeping the seal column as it was (they have no key)."""
    conn = sqlite3.connect(home / "catalog.db")
    rows = conn.execute("SELECT seq, ts, actor, action, object, details FROM audit_log ORDER BY seq").fetchall()
    conn.executescript("DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete; DELETE FROM audit_log;")
    prev, seq, heads = GENESIS_HASH, 0, {}
    for _old_seq, ts, actor, action, obj, details in rows:
        if _old_seq == drop_seq:
            continue
        seq += 1
        digest = compute_entry_hash(prev, seq, ts, actor, action, obj, json.loads(details))
        conn.execute("INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     [seq, ts, actor, action, obj, details, prev, digest])
        prev, heads[seq] = digest, digest
    conn.executescript(ORIGINAL_TRIGGERS)
    conn.commit()
    conn.close()
    anchor = home / "audit-anchor.log"
    seals = {int(line.split()[1]): line.split()[3] for line in anchor.read_text().splitlines()}
    anchor.write_text("".join(f"v1 {s} {h} {seals.get(s, '-')}\n" for s, h in heads.items()))


def test_a_rewritten_chain_and_anchor_fail_the_vault_seal(airlock_home, monkeypatch):
    monkeypatch.setenv("AIRLOCK_KDF_PROFILE", "test")
    from appliance.vault.audit_seal import seal_key

    db = open_catalog()
    keys = _unlocked_vault(db)
    set_anchor_key_provider(lambda d: seal_key(d, keys))
    for i in range(5):
        append_audit(db, "test.event", f"object-{i}", {"i": i})
    report = verify_chain(db)
    assert report.ok, report.reason
    assert report.anchor.sealed >= 5 and report.anchor.seals_checked
    assert "seals verified" in report.anchor.describe()
    assert [e.action for e in iter_audit(db, action="audit.")] == ["audit.seal_key_created"]
    db.close()

    _rewrite_without_row(airlock_home, drop_seq=3)
    db = open_catalog()
    report = verify_chain(db)
    assert not report.ok and "does not verify with the vault's audit key" in report.reason

    # Locked (no key): verify says it could not check the seals; the rewrite is self-consistent.
    set_anchor_key_provider(lambda d: None)
    report = verify_chain(db)
    assert "seals NOT checked: the vault is locked" in report.anchor.describe()


def test_the_seal_key_object_cannot_be_shredded(airlock_home, monkeypatch):
    monkeypatch.setenv("AIRLOCK_KDF_PROFILE", "test")
    from appliance.vault.audit_seal import OBJECT_ID, seal_key
    from appliance.vault.errors import ObjectError
    from appliance.vault.store import delete_object

    db = open_catalog()
    keys = _unlocked_vault(db)
    first = seal_key(db, keys)
    assert seal_key(db, keys) == first and len(first) == 32
    with pytest.raises(ObjectError, match="never deleted"):
        delete_object(db, airlock_home, OBJECT_ID)


def test_os_identity_comes_from_the_real_uid_not_the_environment(airlock_home):
    import os
    import pwd

    real = pwd.getpwuid(os.getuid()).pw_name
    result = run_cli("audit", "verify", env={"LOGNAME": "mallory", "USER": "mallory", "SSH_CLIENT": "10.6.6.6 1 22"})
    assert result.returncode == 0, result.stderr
    [entry] = list(iter_audit(open_catalog(), action="audit.verify"))
    assert entry.actor == f"os:{real}" and "mallory" not in entry.actor


def test_unlock_origin_names_the_real_uid_and_labels_the_ssh_claim(monkeypatch):
    import os
    import pwd

    from appliance.access import origin

    monkeypatch.setenv("LOGNAME", "mallory")
    monkeypatch.setenv("USER", "mallory")
    monkeypatch.setenv("SSH_CLIENT", "10.6.6.6 1 22")
    text = origin()
    assert text.startswith(f"os:{pwd.getpwuid(os.getuid()).pw_name}") and "os:mallory" not in text
    assert "ssh-claimed:10.6.6.6" in text and " ssh:" not in text
