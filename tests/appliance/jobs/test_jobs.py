"""Jobs as real detached processes: success, failure with a hint, vanished processes, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from appliance.catalog import open_catalog
from appliance.jobs import records
from appliance.jobs.records import JobError
from appliance.jobs.runner import process_start_time, reconcile_jobs, resume_job, start_job, wait_for
from tests.conftest import run_cli

PASSPHRASE = "jobs test pass phrase"


@pytest.fixture
def vault_unlocked(airlock_home, monkeypatch, tmp_path):
    monkeypatch.setenv("AIRLOCK_KDF_PROFILE", "test")
    secret = tmp_path / "pass.txt"
    secret.write_text(PASSPHRASE)
    assert run_cli("vault", "init", "--passphrase-file", str(secret)).returncode == 0
    unlocked = run_cli("vault", "unlock", "--passphrase-file", str(secret))
    assert unlocked.returncode == 0, unlocked.stderr
    yield
    run_cli("vault", "lock")


def test_job_runs_detached_and_succeeds(vault_unlocked):
    db = open_catalog()
    job = start_job(db, "vault_verify", {})
    done = wait_for(db, job.id, timeout_s=120)
    assert done.state == "succeeded", (done.error, done.hint)
    assert done.result == {"ok": True, "files_checked": 0, "files_failed": 0}
    assert done.pid and done.pid != os.getpid()
    kinds = [e.message for e in records.events(db, job.id, kind="state")]
    assert kinds == ["queued", "running", "succeeded"]
    actions = [r[0] for r in db.execute("SELECT action FROM audit_log WHERE object = ?", [job.id])]
    assert actions == ["job.create", "job.running", "job.succeeded"]


def test_job_needing_keys_fails_with_vault_is_locked(airlock_home, monkeypatch, tmp_path):
    monkeypatch.setenv("AIRLOCK_KDF_PROFILE", "test")
    secret = tmp_path / "pass.txt"
    secret.write_text(PASSPHRASE)
    assert run_cli("vault", "init", "--passphrase-file", str(secret)).returncode == 0
    db = open_catalog()
    job = wait_for(db, start_job(db, "vault_verify", {}).id, timeout_s=120)
    assert job.state == "failed"
    assert "vault is locked" in job.error and "airlock vault unlock" in job.hint
    shown = run_cli("jobs", "show", job.id)
    assert "vault is locked" in shown.stdout and shown.returncode == 0


def test_vanished_process_is_marked_interrupted_and_can_be_resumed(airlock_home):
    db = open_catalog()
    job = records.create_job(db, "vault_verify", {})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start_time(gone.pid)
    gone.wait()
    records.set_state(db, job.id, "running", pid=gone.pid, pid_start=start or "0")
    assert reconcile_jobs(db) == [job.id]
    lost = records.get_job(db, job.id)
    assert lost.state == "interrupted" and f"airlock jobs resume {job.id}" in lost.hint

    alive = records.create_job(db, "vault_verify", {})  # this test process stands in for a live job process
    records.set_state(db, alive.id, "running", pid=os.getpid(), pid_start=process_start_time(os.getpid()))
    assert reconcile_jobs(db) == []
    with pytest.raises(JobError, match="only interrupted, cancelled or failed jobs resume"):
        resume_job(db, alive.id)


def test_cancel_of_a_finished_job_is_refused(airlock_home):
    db = open_catalog()
    job = records.create_job(db, "vault_verify", {})
    records.set_state(db, job.id, "failed", error="x")
    result = run_cli("jobs", "cancel", job.id)
    assert result.returncode == 2 and "already failed" in result.stderr


def test_cli_list_show_logs_json(airlock_home):
    db = open_catalog()
    job = records.create_job(db, "vault_verify", {"sample": 3})
    records.add_event(db, job.id, "progress", "", {"step": 2, "total_steps": 10, "loss": 1.25, "eta_s": 30})
    listed = json.loads(run_cli("jobs", "list", "--json").stdout)
    assert [j["id"] for j in listed["jobs"]] == [job.id]
    assert set(listed["jobs"][0]) >= {"id", "kind", "state", "params", "actor", "device", "created_at", "error",
                                      "hint", "result"}
    text = run_cli("jobs", "list").stdout
    assert "step 2/10 loss 1.2500 eta" in text
    shown = json.loads(run_cli("jobs", "show", job.id, "--json").stdout)
    assert shown["last_progress"]["step"] == 2 and shown["job"]["params"] == {"sample": 3}
    logs = json.loads(run_cli("jobs", "logs", job.id, "--json").stdout)
    assert [e["kind"] for e in logs["events"]] == ["state", "progress"]
    missing = run_cli("jobs", "show", "nope")
    assert missing.returncode == 2 and "no job 'nope'" in missing.stderr


def test_code_planted_in_the_working_directory_never_runs_in_the_agent_or_a_job(airlock_home, monkeypatch,
                                                                               tmp_path):
    """The key agent and each job are `python -I -m ...` children: an `appliance/` package in the directory the
    operator (or the service) stands in is not on their sys.path. Without -I both would import it first."""
    from tests.conftest import BIN

    monkeypatch.setenv("AIRLOCK_KDF_PROFILE", "test")
    planted = tmp_path / "stick"
    marker = tmp_path / "planted-code-ran"
    (planted / "appliance").mkdir(parents=True)
    (planted / "appliance" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    secret = tmp_path / "pass.txt"
    secret.write_text(PASSPHRASE)
    assert run_cli("vault", "init", "--passphrase-file", str(secret)).returncode == 0
    unlocked = subprocess.run([str(BIN / "airlock"), "vault", "unlock", "--passphrase-file", str(secret)],
                              cwd=planted, capture_output=True, text=True, timeout=120, check=False)
    try:
        assert unlocked.returncode == 0, unlocked.stderr
        monkeypatch.chdir(planted)  # the job's process starts here
        db = open_catalog()
        job = wait_for(db, start_job(db, "vault_verify", {}).id, timeout_s=120)
        assert job.state == "succeeded", (job.error, job.hint)
        assert not marker.exists()
    finally:
        run_cli("vault", "lock")
