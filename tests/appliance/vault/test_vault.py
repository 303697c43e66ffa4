"""The vault end to end: real CLI, real detached agent, real files and crypto, real audit rows."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from appliance.audit import iter_audit, verify_chain
from appliance.catalog import open_catalog
from appliance.vault import records, store
from appliance.vault.agent import agent_status, socket_path
from appliance.vault.errors import ObjectError, StreamError, VaultLockedError
from appliance.vault.keys import LocalKeys
from appliance.vault.lifecycle import Credential, keys_for, open_root
from tests.appliance.vault.conftest import PASSPHRASE, _alive
from tests.conftest import REPO, all_pytest_folders, catalog_bytes, files_holding, run_cli

LOCKED_LINE = "error: vault is locked"


def _open(home: Path):
    db = open_catalog()
    return db, keys_for(db, home)


def _actions(db, family: str = "vault.") -> list[str]:
    return [e.action for e in iter_audit(db, action=family)]


def _wait_locked(home: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while agent_status(home) is not None:
        assert time.monotonic() < deadline, "the agent did not lock after its idle timeout"
        time.sleep(0.2)


def _job(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    """Another process (a training job, say) using the vault through the agent."""
    prelude = ("import sys\nfrom pathlib import Path\nfrom appliance.catalog import open_catalog\n"
               "from appliance.paths import airlock_home\nfrom appliance.vault import store\n"
               "from appliance.vault.lifecycle import keys_for\nfrom bundler.errors import AirlockError\n"
               "home = airlock_home()\ndb = open_catalog()\n")
    wrapped = prelude + "try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) + (
        "except AirlockError as exc:\n    print('error: ' + exc.message, file=sys.stderr)\n"
        "    print('hint: ' + exc.hint, file=sys.stderr)\n    sys.exit(2)\n")
    return subprocess.run([sys.executable, "-c", wrapped, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60, check=False, **kwargs)


def test_init_unlock_store_rotate_delete_end_to_end(airlock_home, vault_init, unlock):
    recovery = vault_init()
    assert run_cli("vault", "status").stdout.startswith("vault: locked")
    unlock()
    shown = run_cli("vault", "status").stdout
    assert shown.startswith("vault: unlocked") and "vault: locked" not in shown
    db, keys = _open(airlock_home)
    store.create_object(db, keys, "dataset-1", "dataset")
    payload = os.urandom(3 * 1024 * 1024 + 17)
    path = store.write_bytes(db, keys, airlock_home, "dataset-1", "shard-0", payload)
    assert store.read_bytes(db, keys, airlock_home, "dataset-1", "shard-0") == payload
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    ciphertext = path.read_bytes()

    before = records.dek(db, "dataset-1")
    rotated = run_cli("vault", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    # 2: dataset-1 and the audit anchor's seal key (a DEK too, created by the first unlocked command)
    assert "version 2: 2 data keys re-wrapped" in rotated.stdout
    after = records.dek(db, "dataset-1")
    assert (after.kek_version, before.kek_version) == (2, 1) and after.wrapped_dek != before.wrapped_dek
    assert path.read_bytes() == ciphertext  # rotation never touches data files
    assert store.read_bytes(db, keys, airlock_home, "dataset-1", "shard-0") == payload
    assert db.execute("SELECT wrapped_kek FROM vault_keks WHERE version = 1").fetchone()[0] is None

    deleted = run_cli("vault", "delete", "dataset-1", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert not path.exists()
    shredded = records.dek(db, "dataset-1")
    assert (shredded.state, shredded.wrapped_dek) == ("shredded", None)
    # The wrapped DEK is gone from the catalog's bytes too (secure_delete + WAL checkpoint).
    on_disk = catalog_bytes(airlock_home)
    assert after.wrapped_dek not in on_disk and before.wrapped_dek not in on_disk
    with pytest.raises(ObjectError, match="object dataset-1 was deleted: its key was destroyed"):
        store.read_bytes(db, keys, airlock_home, "dataset-1", "shard-0")
    # Even the root key (opened with the recovery key) has nothing left to unwrap: put the old
    # ciphertext back and try every path to a data key.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ciphertext)
    _, root = open_root(db, Credential.recovery(recovery))
    with pytest.raises(ObjectError, match="was deleted"):
        store.read_bytes(db, LocalKeys(root), airlock_home, "dataset-1", "shard-0")
    assert _actions(db) == ["vault.init", "vault.unlock", "vault.object_create", "vault.write", "vault.read",
                            "vault.rotate", "vault.read", "vault.delete"]
    assert verify_chain(db).ok


def test_wrong_passphrase_same_message_growing_delay_audited(airlock_home, vault_init, unlock, tmp_path):
    vault_init()
    bad = tmp_path / "bad.txt"
    outputs = []
    for attempt in ["wrong horse battery staple", PASSPHRASE + " ", PASSPHRASE[:-1]]:
        bad.write_text(attempt)
        result = unlock("--passphrase-file", str(bad), expect_ok=False)
        assert result.returncode == 2
        outputs.append(result.stderr)
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0].startswith("error: the vault did not unlock: that passphrase is not correct\nhint: ")
    db = open_catalog()
    failures = [e.details for e in iter_audit(db, action="vault.unlock_failed")]
    assert [f["failures"] for f in failures] == [1, 2, 3]
    assert failures[0]["delay_s"] < failures[1]["delay_s"] < failures[2]["delay_s"]
    assert PASSPHRASE not in json.dumps(failures)
    unlock()
    assert records.unlock_failures(db) == (0, None)


def test_tampered_slot_fails_like_a_wrong_passphrase(airlock_home, vault_init, unlock, tmp_path):
    vault_init()
    db = open_catalog()
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("another passphrase entirely")
    reference = unlock("--passphrase-file", str(wrong), expect_ok=False).stderr
    wrapped = bytearray(db.execute("SELECT wrapped_root FROM vault_key_slots WHERE slot_id = 'passphrase-1'")
                        .fetchone()[0])
    wrapped[30] ^= 0x80
    db.execute("UPDATE vault_key_slots SET wrapped_root = ? WHERE slot_id = 'passphrase-1'", [bytes(wrapped)])
    assert unlock(expect_ok=False).stderr == reference
    # A slot whose parameters were edited (here: weakened memory) is no better.
    kdf = json.loads(db.execute("SELECT kdf FROM vault_key_slots WHERE slot_id = 'passphrase-1'").fetchone()[0])
    wrapped[30] ^= 0x80
    kdf["memory_kib"] = 8
    db.execute("UPDATE vault_key_slots SET wrapped_root = ?, kdf = ? WHERE slot_id = 'passphrase-1'",
               [bytes(wrapped), json.dumps(kdf)])
    assert unlock(expect_ok=False).stderr == reference
    assert agent_status(airlock_home) is None


def test_recovery_key_unlocks_and_resets_a_forgotten_passphrase(airlock_home, vault_init, unlock, tmp_path):
    recovery = vault_init()
    recovery_file, new_file = tmp_path / "recovery.txt", tmp_path / "new.txt"
    recovery_file.write_text(recovery.lower().replace("-", " ") + "\n")
    new_file.write_text("a brand new long passphrase")
    changed = run_cli("vault", "passwd", "--recovery-key-file", str(recovery_file), "--new-passphrase-file",
                      str(new_file))
    assert changed.returncode == 0, changed.stderr
    assert unlock(expect_ok=False).returncode == 2  # the old passphrase no longer opens it
    unlock("--passphrase-file", str(new_file))
    run_cli("vault", "lock")
    unlock("--recovery-key-file", str(recovery_file))
    assert agent_status(airlock_home) is not None
    db = open_catalog()
    assert "vault.passwd" in _actions(db)
    catalog_bytes = (airlock_home / "catalog.db").read_bytes() + (airlock_home / "catalog.db-wal").read_bytes()
    assert recovery.encode() not in catalog_bytes and b"a brand new long passphrase" not in catalog_bytes


def test_machine_key_slot_is_explicit_audited_and_root_only(airlock_home, vault_init, unlock):
    vault_init("--machine-key")
    key_file = airlock_home / "vault" / "machine.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    db = open_catalog()
    init_row = next(iter_audit(db, action="vault.init"))
    assert init_row.details["machine_slot"] is True and init_row.details["machine_key_file"] == str(key_file)
    key_file.chmod(0o644)
    loose = unlock("--machine-key", expect_ok=False)
    assert loose.returncode == 2 and "must be owned by this account and mode 0600" in loose.stderr
    key_file.chmod(0o600)
    unlock("--machine-key")
    unlocked = next(iter_audit(db, action="vault.unlock"))
    assert unlocked.details["slot_id"] == "machine-1" and unlocked.details["credential"] == "machine"


def test_add_slot_recovery_and_machine(airlock_home, vault_init, passphrase_file):
    vault_init()
    added = run_cli("vault", "add-slot", "--kind", "machine", "--passphrase-file", str(passphrase_file))
    assert added.returncode == 0 and "slot machine-1 added" in added.stdout
    second = run_cli("vault", "add-slot", "--kind", "recovery", "--passphrase-file", str(passphrase_file))
    assert "slot recovery-2 added" in second.stdout and "RECOVERY KEY" in second.stdout
    status = json.loads(run_cli("vault", "status", "--json").stdout)
    assert [s["slot_id"] for s in status["slots"]] == ["machine-1", "passphrase-1", "recovery-1", "recovery-2"]
    assert [e.object for e in iter_audit(open_catalog(), action="vault.add_slot")] == ["machine-1", "recovery-2"]


def test_status_json_keys_and_lock(airlock_home, vault_init, unlock, agents):
    locked = json.loads(run_cli("vault", "status", "--json").stdout)
    assert locked["initialized"] is False and locked["state"] == "locked"
    vault_init()
    unlock("--passphrase-file", str(airlock_home.parent / "passphrase.txt"), "--idle-timeout", "600")
    status = json.loads(run_cli("vault", "status", "--json").stdout)
    assert set(status) == {"initialized", "vault_id", "state", "seconds_left", "idle_timeout_s", "agent_pid",
                           "kek_version", "slots", "objects", "unlock_failures", "account", "role", "session",
                           "emergencies_pending", "shreds_pending"}
    assert (status["account"], status["role"], status["session"]) == ("admin", "admin", "normal")
    assert status["state"] == "unlocked" and 590 <= status["seconds_left"] <= 600
    assert status["idle_timeout_s"] == 600 and status["objects"] == {"active": 0, "deleted": 0}
    pid = status["agent_pid"]
    # The agent: private socket, same-uid peers only, no core dumps.
    sock = socket_path(airlock_home)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert next(line for line in limits.splitlines() if line.startswith("Max core file size")).split()[4:6] \
        == ["0", "0"]
    assert run_cli("vault", "lock").stdout.strip() == "vault locked"
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid) and not sock.exists()
    assert json.loads(run_cli("vault", "status", "--json").stdout)["state"] == "locked"
    assert run_cli("vault", "lock").stdout.strip() == "vault was already locked"


def test_idle_timeout_locks_and_a_later_job_fails_cleanly(airlock_home, vault_init, unlock, passphrase_file):
    vault_init()
    unlock()
    db, keys = _open(airlock_home)
    store.create_object(db, keys, "model-1", "model")
    assert run_cli("vault", "lock").returncode == 0
    # Unlocked again with a 1 s idle timeout only now: no key use is left to race the timer on a loaded machine.
    unlock("--passphrase-file", str(passphrase_file), "--idle-timeout", "1")
    _wait_locked(airlock_home)
    job = _job("store.write_bytes(db, keys_for(db, home), home, 'model-1', 'adapter', b'weights' * 1000)")
    assert job.returncode == 2
    assert job.stderr.splitlines()[0] == LOCKED_LINE
    assert "hint: run `airlock vault unlock`" in job.stderr
    assert sorted(p.name for p in (airlock_home / "vault" / "objects").glob("**/*")) == []  # nothing half-written
    for command in (["vault", "rotate"], ["vault", "verify"]):
        result = run_cli(*command)
        assert result.returncode == 2 and result.stderr.startswith(LOCKED_LINE) and "hint:" in result.stderr
        assert "airlock vault unlock" in result.stderr
    assert next(iter_audit(db, action="vault.lock", newest_first=True)).details == {"reason": "idle_timeout",
                                                                                      "account": "admin"}


def test_key_use_restarts_the_idle_timer(airlock_home, vault_init, unlock, passphrase_file):
    vault_init()
    unlock("--passphrase-file", str(passphrase_file), "--idle-timeout", "3")
    db, keys = _open(airlock_home)
    store.create_object(db, keys, "dataset-1", "dataset")
    for i in range(4):  # 4 x 0.8 s > 3 s, but each key use restarts the timer (2.2 s to spare at each step)
        time.sleep(0.8)
        store.write_bytes(db, keys, airlock_home, "dataset-1", f"part-{i}", b"x")
    assert agent_status(airlock_home) is not None
    _wait_locked(airlock_home)
    with pytest.raises(VaultLockedError, match="vault is locked"):
        store.read_bytes(db, keys, airlock_home, "dataset-1", "part-0")


def test_failed_write_leaves_nothing_and_killed_write_leaves_only_ciphertext(airlock_home, vault_init, unlock):
    vault_init()
    unlock()
    db, keys = _open(airlock_home)
    store.create_object(db, keys, "dataset-1", "dataset")
    marker = f"PHI-MARKER-{uuid.uuid4().hex}".encode()

    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.sent = 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            if self.sent > 2 * 1024 * 1024:
                raise OSError("USB stick removed")
            self.sent += n
            return (marker * (n // len(marker) + 1))[:n]

    with pytest.raises(OSError, match="USB stick removed"):
        store.write_file(db, keys, airlock_home, "dataset-1", "shard-0", Failing())
    folder = airlock_home / "vault" / "objects" / "dataset-1"
    assert list(folder.iterdir()) == []

    # A writer killed mid-file: its temp file (ciphertext) remains, the real name never appears.
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys\nfrom appliance.catalog import open_catalog\nfrom appliance.paths import airlock_home\n"
        "from appliance.vault import store\nfrom appliance.vault.lifecycle import keys_for\n"
        "db = open_catalog(); home = airlock_home()\n"
        "store.write_file(db, keys_for(db, home), home, 'dataset-1', 'shard-1', sys.stdin.buffer)\n")],
        stdin=subprocess.PIPE, cwd=REPO)
    assert writer.stdin is not None
    writer.stdin.write(marker * (4 * 1024 * 1024 // len(marker) + 1))  # 4 segments and a bit; stdin stays open
    writer.stdin.flush()
    deadline = time.monotonic() + 30
    while not any(p.stat().st_size > 2 * 1024 * 1024 for p in folder.iterdir()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    writer.kill()
    writer.wait()
    leftovers = list(folder.iterdir())
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0].name and not (folder / "shard-1.alv").exists()
    assert marker not in leftovers[0].read_bytes()
    assert store.list_files(airlock_home, "dataset-1") == []


def test_verify_reports_each_file_and_names_the_tampered_one(airlock_home, vault_init, unlock):
    vault_init()
    unlock()
    db, keys = _open(airlock_home)
    for obj in ("dataset-1", "model-1"):
        store.create_object(db, keys, obj, obj.split("-")[0])
        for name in ("a", "b"):
            store.write_bytes(db, keys, airlock_home, obj, name, os.urandom(5000))
    ok = run_cli("vault", "verify", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert set(report) == {"ok", "files_checked", "files_failed", "sampled", "files"}
    assert (report["ok"], report["files_checked"], report["sampled"]) == (True, 4, False)
    assert set(report["files"][0]) == {"object_id", "name", "path", "ok", "bytes", "error"}

    target = store.file_path(airlock_home, "model-1", "b")
    blob = bytearray(target.read_bytes())
    blob[-5] ^= 1
    target.write_bytes(bytes(blob))
    shutil.copy(store.file_path(airlock_home, "dataset-1", "a"), store.file_path(airlock_home, "model-1", "a"))
    bad = run_cli("vault", "verify")
    assert bad.returncode == 1
    assert "2 failed" in bad.stdout
    report = json.loads(run_cli("vault", "verify", "--json").stdout)
    failed = {(f["object_id"], f["name"]): f["error"] for f in report["files"] if not f["ok"]}
    assert set(failed) == {("model-1", "a"), ("model-1", "b")}
    assert "moved or copied from another object" in failed[("model-1", "a")]
    assert str(target) in failed[("model-1", "b")] and "segment 0" not in failed[("model-1", "b")]
    sample = json.loads(run_cli("vault", "verify", "--sample", "1", "--json").stdout)
    assert (sample["files_checked"], sample["sampled"]) == (1, True)
    rows = [e.details for e in iter_audit(db, action="vault.verify")]
    assert [r["files_failed"] for r in rows] == [0, 2, 2, sample["files_failed"]]
    assert rows[1]["failed"] == ["model-1/a", "model-1/b"]


def test_store_refuses_bad_ids_duplicates_and_a_file_moved_between_objects(airlock_home, vault_init, unlock):
    vault_init()
    unlock()
    db, keys = _open(airlock_home)
    for bad in ("../etc", ".hidden", "a/b", "", "x" * 200):
        with pytest.raises(ObjectError, match="is not allowed"):
            store.create_object(db, keys, bad, "dataset")
    store.create_object(db, keys, "dataset-1", "dataset")
    store.create_object(db, keys, "dataset-2", "dataset")
    with pytest.raises(ObjectError, match="already exists"):
        store.create_object(db, keys, "dataset-1", "dataset")
    store.write_bytes(db, keys, airlock_home, "dataset-1", "records", b"patient records")
    with pytest.raises(ObjectError, match="already exists"):
        store.write_bytes(db, keys, airlock_home, "dataset-1", "records", b"again")
    moved = store.file_path(airlock_home, "dataset-2", "records")
    moved.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(store.file_path(airlock_home, "dataset-1", "records"), moved)
    with pytest.raises(StreamError, match=rf"{moved} was encrypted under data key .* moved or copied"):
        store.read_bytes(db, keys, airlock_home, "dataset-2", "records")
    # Renamed within the same object (same DEK): the file id in the AEAD still catches it.
    shutil.copy(store.file_path(airlock_home, "dataset-1", "records"),
                store.file_path(airlock_home, "dataset-1", "other"))
    with pytest.raises(StreamError, match="does not authenticate as object dataset-1/other"):
        store.read_bytes(db, keys, airlock_home, "dataset-1", "other")
    assert [(e.object, e.details["file"]) for e in iter_audit(db, action="vault.read_failed")] == [
        ("dataset-2", "records"), ("dataset-1", "other")]
    with pytest.raises(ObjectError, match="is not in the vault"):
        store.read_bytes(db, keys, airlock_home, "dataset-9", "records")
    # A wrapped DEK copied onto another object's row does not unwrap.
    wrapped = db.execute("SELECT wrapped_dek FROM vault_deks WHERE object_id = 'dataset-1'").fetchone()[0]
    db.execute("UPDATE vault_deks SET wrapped_dek = ? WHERE object_id = 'dataset-2'", [wrapped])
    with pytest.raises(ObjectError, match="object dataset-2: the data key of object dataset-2 does not unwrap"):
        store.read_bytes(db, keys, airlock_home, "dataset-2", "records")


def test_no_plaintext_on_disk_after_a_store_read_cycle(airlock_home, vault_init, unlock, tmp_path):
    """The job, the CLI and the agent get their own HOME and TMPDIR (scanned whole), and the real
    temp dir is scanned for files changed since the test began (but pytest's folders, this one's among them)."""
    started = time.time() - 1
    env = {"HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    for folder in env.values():
        Path(folder).mkdir()
    vault_init()
    unlock()
    marker = f"PHI-MARKER-{uuid.uuid4().hex}"
    record = (f"patient: {marker}\n" * 100000).encode()  # several segments
    job = _job("store.create_object(db, keys_for(db, home), 'dataset-1', 'dataset')\n"
               "store.write_file(db, keys_for(db, home), home, 'dataset-1', 'notes', sys.stdin.buffer)\n"
               "data = store.read_bytes(db, keys_for(db, home), home, 'dataset-1', 'notes')\n"
               "assert data.count(sys.argv[1].encode()) == 100000\n", marker, input=record.decode(),
               env={**os.environ, **env})
    assert job.returncode == 0, job.stderr
    assert run_cli("vault", "verify", env=env).returncode == 0
    assert run_cli("vault", "lock", env=env).returncode == 0
    hits = files_holding([airlock_home, tmp_path], marker.encode())
    hits += files_holding(Path(tempfile.gettempdir()), marker.encode(), since=started,
                          skip=[all_pytest_folders(tmp_path)])
    assert hits == []
    control = tmp_path / "tmp" / "control.txt"  # the scan does find a marker that is there
    control.write_bytes(record[:1000])
    assert files_holding(tmp_path, marker.encode(), since=started) == [(str(control), marker.encode())]


def test_uninitialized_vault_says_what_to_do(airlock_home, passphrase_file):
    result = run_cli("vault", "unlock", "--passphrase-file", str(passphrase_file))
    assert result.returncode == 2
    assert result.stderr.startswith("error: there is no vault under this AIRLOCK_HOME yet\n"
                                    "hint: run `airlock vault init`")
    assert run_cli("vault", "init", "--passphrase-file", str(passphrase_file)).returncode == 0
    again = run_cli("vault", "init", "--passphrase-file", str(passphrase_file))
    assert again.returncode == 2 and "already has a vault" in again.stderr
    short = passphrase_file.parent / "short.txt"
    short.write_text("too short")
    result = run_cli("vault", "passwd", "--passphrase-file", str(passphrase_file), "--new-passphrase-file", str(short))
    assert result.returncode == 2 and "shorter than 12 characters" in result.stderr


def test_model_weights_round_trip_through_memory_only(airlock_home, vault_init, unlock):
    """Adapters are stored like data: encrypted, and loaded from bytes (safetensors), never a plaintext file."""
    import numpy as np
    from safetensors.numpy import load, save

    vault_init()
    unlock()
    db, keys = _open(airlock_home)
    store.create_object(db, keys, "model-1", "model")
    weights = {"lora_A": np.arange(12, dtype=np.float32).reshape(3, 4)}
    store.write_bytes(db, keys, airlock_home, "model-1", "adapter.safetensors", save(weights))
    loaded = load(store.read_bytes(db, keys, airlock_home, "model-1", "adapter.safetensors"))
    assert np.array_equal(loaded["lora_A"], weights["lora_A"])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_agent_refuses_a_peer_with_another_uid(airlock_home, vault_init, unlock):
    vault_init()
    unlock()
    sock = socket_path(airlock_home)
    # Open the directory and socket modes up on purpose: SO_PEERCRED must still refuse the peer.
    sock.parent.chmod(0o711)
    sock.chmod(0o666)
    try:
        reply = _ask_as_uid(65534, sock, b'{"op": "status"}\n')
    finally:
        sock.parent.chmod(0o700)
        sock.chmod(0o600)
    assert reply.get("ok") is False, reply
    assert "serves uid 0 only (peer uid 65534)" in reply["error"]
    assert "vault_id" not in reply


def _ask_as_uid(uid: int, path: Path, request: bytes) -> dict:
    """Fork, drop to `uid`, send one request to the agent; the reply comes back through a pipe."""
    import socket

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(10)
                client.connect(str(path))
                with contextlib.suppress(BrokenPipeError):  # the agent may answer and hang up first
                    client.sendall(request)
                os.write(write_end, client.recv(4096))
        except BaseException as exc:
            os.write(write_end, json.dumps({"child_error": repr(exc)}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)
