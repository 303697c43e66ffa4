"""Crypto-shredding you can prove (issue 20, item 4): a reader holding an old snapshot blocks the
WAL checkpoint; the shred then says it is not complete (the wrapped key is still on disk, which
this test finds in the file bytes), and it completes once the reader lets go."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from appliance.audit import iter_audit, verify_chain
from appliance.catalog import open_catalog
from appliance.vault import records, store
from appliance.vault.keys import LocalKeys
from appliance.vault.keyslots import passphrase_kdf
from appliance.vault.lifecycle import Credential, init_vault, open_root
from tests.conftest import REPO, catalog_bytes, run_cli


def _on_disk(home: Path) -> bytes:
    return catalog_bytes(home)  # read in a child: this process's own connections keep their locks


class _Reader:
    """A real second process (the server, the TUI, a job) with an open read transaction on the catalog.

    In another process on purpose: POSIX locks belong to a process, and this test reads the
    catalog's files, which would drop a same-process reader's locks when it closes them."""

    def __init__(self, home: Path) -> None:
        code = ("import sqlite3, sys\n"
                "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "conn.execute('BEGIN')\n"
                "conn.execute('SELECT COUNT(*) FROM vault_deks').fetchone()\n"
                "print('reading', flush=True)\n"
                "sys.stdin.readline()\n"
                "conn.execute('COMMIT')\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(home / "catalog.db")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "reading"

    def let_go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("done\n")
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


def _vault_with_object(home: Path):
    db = open_catalog()
    result = init_vault(db, "correct horse battery staple", passphrase_kdf())
    _, root = open_root(db, Credential.recovery(result.recovery_key))
    keys = LocalKeys(root)
    store.create_object(db, keys, "dataset-1", "dataset")
    store.write_bytes(db, keys, home, "dataset-1", "shard-0", b"patient records")
    wrapped = records.dek(db, "dataset-1").wrapped_dek
    assert wrapped is not None and wrapped in _on_disk(home)
    return db, wrapped


def test_a_reader_holding_a_snapshot_keeps_the_shred_pending_until_it_lets_go(airlock_home):
    db, wrapped = _vault_with_object(airlock_home)
    reader = _Reader(airlock_home)

    store.delete_object(db, airlock_home, "dataset-1")
    assert records.dek(db, "dataset-1").state == "shredded"
    # The attack on the old code: "done" while the key is still in the WAL or the database file.
    assert wrapped in _on_disk(airlock_home)
    assert records.pending_shreds(db) == ["dataset-1"]
    note = store.shred_pending_note(db)
    assert note.startswith("NOT YET COMPLETE: the destroyed key of dataset-1 may still be on disk")
    # Still blocked: trying again while the reader holds on changes nothing.
    assert store.finish_pending_shreds(db) == ["dataset-1"]
    shown = run_cli("vault", "status")
    assert shown.returncode == 0 and "NOT YET COMPLETE" in shown.stdout

    reader.let_go()
    shown = run_cli("vault", "status", "--json")  # any `vault status` completes what is pending
    assert shown.returncode == 0, shown.stderr
    db = open_catalog()
    assert records.pending_shreds(db) == [] and store.shred_pending_note(db) == ""
    assert wrapped not in _on_disk(airlock_home)
    [late] = list(iter_audit(db, action="vault.shred_complete"))
    assert late.details == {"objects": ["dataset-1"], "wal_checkpoint": "complete"}
    assert verify_chain(db).ok


def test_an_unblocked_shred_completes_at_once_and_writes_no_sequel(airlock_home):
    db, wrapped = _vault_with_object(airlock_home)
    store.delete_object(db, airlock_home, "dataset-1")
    assert records.pending_shreds(db) == [] and wrapped not in _on_disk(airlock_home)
    assert list(iter_audit(db, action="vault.shred_complete")) == []


def test_a_shred_in_another_process_reports_not_complete_while_a_reader_blocks(airlock_home):
    db, wrapped = _vault_with_object(airlock_home)
    db.close()
    # The shredding process, the reader and this test are three processes, as on an appliance.
    reader = _Reader(airlock_home)
    code = ("from appliance.catalog import open_catalog\nfrom appliance.paths import airlock_home\n"
            "from appliance.vault.store import delete_object, shred_pending_note\n"
            "db = open_catalog()\ndelete_object(db, airlock_home(), 'dataset-1')\nprint(shred_pending_note(db))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                         check=True).stdout
    assert "NOT YET COMPLETE" in out and wrapped in _on_disk(airlock_home)
    reader.let_go()
    assert store.finish_pending_shreds(open_catalog()) == []
    assert wrapped not in _on_disk(airlock_home)


def test_vault_delete_says_not_complete_and_exits_3_while_a_reader_blocks(airlock_home, vault_init, unlock):
    from appliance.vault.lifecycle import keys_for

    vault_init()
    unlock()
    db = open_catalog()
    keys = keys_for(db, airlock_home)
    store.create_object(db, keys, "dataset-1", "dataset")
    wrapped = records.dek(db, "dataset-1").wrapped_dek
    db.close()
    reader = _Reader(airlock_home)
    deleted = run_cli("vault", "delete", "dataset-1", "--yes")
    assert deleted.returncode == 3, deleted.stderr
    assert "NOT YET COMPLETE: the destroyed key of dataset-1" in deleted.stderr
    assert "deleted:" not in deleted.stdout and wrapped in _on_disk(airlock_home)
    reader.let_go()
    assert "NOT YET COMPLETE" not in run_cli("vault", "status").stdout
    assert wrapped not in _on_disk(airlock_home)
