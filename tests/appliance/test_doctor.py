"""`airlock doctor`: one table, JSON for scripts, non-zero exit only on a real problem."""

from __future__ import annotations

import json
import sqlite3

from appliance.audit import append_audit
from appliance.catalog import SCHEMA_VERSION, open_catalog
from tests.conftest import run_cli

EXPECTED_CHECKS = {"python", "airlock", "torch", "gpu", "tensorrt", "onnxruntime", "disk", "catalog",
                   "offline mode", "network"}


def test_fresh_machine_passes_with_warnings_only(airlock_home):
    result = run_cli("doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert EXPECTED_CHECKS <= set(checks)
    assert report["status"] in {"ok", "warn"}
    assert all(set(c) == {"name", "status", "detail", "hint"} for c in report["checks"])
    assert checks["gpu"]["status"] in {"ok", "warn"}  # no GPU is a warning, never a failure
    assert "not created yet" in checks["catalog"]["detail"]
    assert not (airlock_home / "catalog.db").exists()  # doctor never writes


def test_table_output_for_people(airlock_home):
    append_audit(open_catalog(), "test.event", "x")
    result = run_cli("doctor")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["check", "status", "detail"]
    assert any(line.startswith("audit chain") and " ok " in line for line in lines)
    assert max(len(line) for line in lines) <= 80  # fits an 80-column SSH terminal


def test_broken_audit_chain_fails_doctor(airlock_home):
    db = open_catalog()
    for i in range(3):
        append_audit(db, "test.event", str(i))
    db.close()
    conn = sqlite3.connect(airlock_home / "catalog.db")
    conn.executescript("DROP TRIGGER audit_log_no_update; UPDATE audit_log SET actor = 'x' WHERE seq = 2;")
    conn.close()
    result = run_cli("doctor", "--json")
    assert result.returncode == 1
    audit = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "audit chain")
    assert audit["status"] == "fail" and "seq 2" in audit["detail"]


def test_catalog_from_newer_release_fails_doctor(airlock_home):
    db = open_catalog()
    db.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, 'later')", [SCHEMA_VERSION + 5])
    db.close()
    result = run_cli("doctor", "--json")
    assert result.returncode == 1
    catalog = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "catalog")
    assert catalog["status"] == "fail" and catalog["hint"]
