"""`airlock demo`, the README's first command, end to end in a real subprocess."""

from __future__ import annotations

from appliance.audit import verify_chain
from appliance.catalog import open_catalog
from tests.conftest import run_cli


def test_demo_prints_doctor_audit_and_generated_text(airlock_home):
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("== 1. doctor", "onnxruntime", "== 2. catalog and audit chain", "chain intact: True",
                     "== 3. tiny model tiny-deepseek-r1 (Qwen2ForCausalLM)", "continuation:", "chat assistant:"):
        assert expected in out
    continuation = next(line for line in out.splitlines() if line.startswith("continuation:"))
    assert len(continuation.split(":", 1)[1].strip()) > 20
    db = open_catalog()
    assert verify_chain(db).ok
    assert db.execute("SELECT action FROM audit_log").fetchall() == [("demo.run",)]
