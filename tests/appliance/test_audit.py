"""The audit chain: append-only, hash-chained, and `verify` names the first broken row."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys

import pytest

from appliance.audit import GENESIS_HASH, append_audit, compute_entry_hash, iter_audit, verify_chain
from appliance.catalog import open_catalog
from appliance.errors import AirlockError
from tests.conftest import REPO, run_cli


def _chain(n: int = 5):
    db = open_catalog()
    for i in range(1, n + 1):
        append_audit(db, "test.event", f"object-{i}", {"i": i, "note": "ünïcode ok"})
    return db


def _tamper(airlock_home, sql: str) -> None:
    """Edit the catalog the way an insider would: the sqlite3 CLI, triggers dropped first."""
    script = ("DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete; " + sql)
    path = str(airlock_home / "catalog.db")
    if shutil.which("sqlite3"):
        subprocess.run(["sqlite3", path, script], check=True)
    else:
        conn = sqlite3.connect(path)
        conn.executescript(script)
        conn.close()


def test_rows_chain_from_genesis():
    db = _chain(3)
    rows = list(iter_audit(db))
    assert [r.seq for r in rows] == [1, 2, 3]
    assert rows[0].prev_hash == GENESIS_HASH
    assert rows[1].prev_hash == rows[0].entry_hash
    assert rows[2].entry_hash == compute_entry_hash(rows[1].entry_hash, 3, rows[2].ts, rows[2].actor,
                                                    "test.event", "object-3", {"i": 3, "note": "ünïcode ok"})
    report = verify_chain(db)
    assert report.ok and report.rows_checked == 3 and report.head_hash == rows[2].entry_hash


def test_triggers_refuse_update_and_delete():
    db = _chain(2)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM audit_log WHERE seq = 2")


def test_edited_row_is_named_by_verify(airlock_home):
    _chain(5).close()
    _tamper(airlock_home, "UPDATE audit_log SET details = '{\"i\":99}' WHERE seq = 3;")
    report = verify_chain(open_catalog())
    assert not report.ok
    assert report.first_broken_seq == 3
    assert "edited" in report.reason


def test_recomputed_hash_still_breaks_the_next_link(airlock_home):
    db = _chain(4)
    row2 = next(r for r in iter_audit(db) if r.seq == 2)
    forged = compute_entry_hash(row2.prev_hash, 2, row2.ts, "os:mallory", row2.action, row2.object, row2.details)
    db.close()
    _tamper(airlock_home, f"UPDATE audit_log SET actor = 'os:mallory', entry_hash = '{forged}' WHERE seq = 2;")
    report = verify_chain(open_catalog())
    # The anchor file outside the catalog recorded row 2's real hash ...
    assert (report.ok, report.first_broken_seq) == (False, 2) and "anchor file recorded" in report.reason
    # ... and without it the next link still breaks.
    (airlock_home / "audit-anchor.log").unlink()
    report = verify_chain(open_catalog())
    assert (report.ok, report.first_broken_seq) == (False, 3)


def test_deleted_row_is_named(airlock_home):
    _chain(5).close()
    _tamper(airlock_home, "DELETE FROM audit_log WHERE seq = 2;")
    report = verify_chain(open_catalog())
    assert (report.ok, report.first_broken_seq) == (False, 2)
    assert "missing" in report.reason


def test_dropped_triggers_alone_are_reported(airlock_home):
    _chain(2).close()
    _tamper(airlock_home, "SELECT 1;")
    report = verify_chain(open_catalog())
    assert not report.ok and "triggers were dropped" in report.reason


def test_truncation_is_caught_by_an_anchor(airlock_home):
    db = _chain(5)
    anchor = (5, verify_chain(db).head_hash)
    db.close()
    _tamper(airlock_home, "DELETE FROM audit_log WHERE seq >= 4; "
            "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log BEGIN SELECT RAISE(ABORT, 'x'); END; "
            "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log BEGIN SELECT RAISE(ABORT, 'x'); END;")
    db = open_catalog()
    report = verify_chain(db, anchor=anchor)  # what the auditor wrote down off the machine
    assert not report.ok and "cut off" in report.reason and report.first_broken_seq == 4
    (airlock_home / "audit-anchor.log").unlink()  # (the anchor file catches it too: test_audit_anchor)
    report = verify_chain(db, anchor=anchor)
    assert not report.ok and "cut off" in report.reason and report.first_broken_seq == 4


def test_secrets_never_enter_details():
    db = open_catalog()
    for field in ("passphrase", "api_key", "private_pem", "token", "recovery_key"):
        with pytest.raises(AirlockError, match="looks like a secret"):
            append_audit(db, "vault.init", "vault", {field: "x"})
    with pytest.raises(AirlockError):
        append_audit(db, "vault.init", "vault", {"slot": {"passphrase": "x"}})
    append_audit(db, "train.start", "run-1", {"tokens_per_s": 5, "key_id": "kek-2", "max_tokens": 3})
    assert db.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0] == 1


def test_concurrent_processes_keep_one_chain(airlock_home):
    open_catalog().close()
    writer = ("import sys\nfrom appliance.catalog import open_catalog\nfrom appliance.audit import append_audit\n"
              "db = open_catalog()\n"
              "for i in range(40): append_audit(db, 'test.concurrent', sys.argv[1], {'i': i})\n")
    procs = [subprocess.Popen([sys.executable, "-c", writer, f"writer-{n}"], cwd=REPO) for n in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    report = verify_chain(open_catalog())
    assert report.ok and report.rows_checked == 120


def test_cli_verify_reports_first_broken_row_and_exits_nonzero(airlock_home):
    _chain(4).close()
    assert run_cli("audit", "verify").returncode == 0
    _tamper(airlock_home, "UPDATE audit_log SET object = 'other' WHERE seq = 2;")
    result = run_cli("audit", "verify")
    assert result.returncode == 1
    assert "first broken row: seq 2" in result.stderr
    as_json = json.loads(run_cli("audit", "verify", "--json").stdout)
    assert as_json["ok"] is False and as_json["first_broken_seq"] == 2


def test_cli_show_and_json(airlock_home):
    _chain(3).close()
    text = run_cli("audit", "show", "--limit", "2")
    assert text.returncode == 0 and "object-3" in text.stdout and "object-1" not in text.stdout
    data = json.loads(run_cli("audit", "show", "--json", "--action", "test.").stdout)
    assert [e["seq"] for e in data["entries"]] == [3, 2, 1]
    assert set(data["entries"][0]) == {"seq", "ts", "actor", "action", "object", "details", "prev_hash",
                                       "entry_hash"}


def test_cli_anchor_round_trip(airlock_home):
    _chain(2).close()
    first = run_cli("audit", "verify")
    head = next(line.split()[1] for line in first.stdout.splitlines() if line.startswith("head:"))
    assert run_cli("audit", "verify", "--anchor", head).returncode == 0
    bad = run_cli("audit", "verify", "--anchor", "nonsense")
    assert bad.returncode == 2 and bad.stderr.startswith("error: anchor") and "hint:" in bad.stderr
