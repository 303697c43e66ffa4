"""`airlock demo --skip-bundle`: stages 3-6 of the README's first command, end to end, real subprocesses.

The same code runs after `make demo` has built and installed a bundle; here it drives the dev
venv's `airlock` (no bundle: tests/e2e/test_bundle_install.py covers building and installing),
inside `unshare -n` where permitted, as the full demo does. Short training runs; the checks are on
what the demo prints: validation loss went down, no fake PHI survived the import, the server
answered a chat completion and classified scans, the retrain's gates decided (either way), the
audit chain is intact, and nothing it started is still running. Then the failure side: a stage that
fails ends the demo with its own error line (the stage, the command's error and hint), and a number
the appliance did not measure is printed as "not measured", never a crash.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from appliance.demo.steps import Report, Stage, format_metric, stage_failed
from appliance.demo.story import _gate_line
from tests.conftest import BIN, REPO, unshare_available


def _processes_using(home: Path) -> list[str]:
    """Command lines of live processes whose environment or arguments name this AIRLOCK_HOME."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if state != "Z" and (f"AIRLOCK_HOME={home}".encode() in environ.split(b"\0") or str(home).encode() in cmdline):
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.mark.slow
@pytest.mark.timeout(1900)
def test_demo_stages_three_to_six(tmp_path: Path):
    work = tmp_path / "demo"
    wrap = ["unshare", "-n"] if unshare_available() else []
    # Test-only KDF profile (tiny Argon2id parameters): the vault's real cost is not what this tests.
    env = {**os.environ, "AIRLOCK_KDF_PROFILE": "test"}
    env.pop("AIRLOCK_HOME", None)
    result = subprocess.run([*wrap, str(BIN / "airlock"), "demo", "--skip-bundle", "--work-dir", str(work),
                             "--lm-steps", "12", "--classifier-steps", "20"],
                            # ~3 minutes on two quiet cores; the bound is for a hang, not for a loaded machine
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=1800, check=False)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-3000:]
    print(out)  # shown by pytest when an assertion below fails

    summary = out[out.index("== summary"):out.index("== artifacts")]
    rows = {line.split("  ")[0]: line for line in summary.splitlines()}
    for stage in ("vault init + unlock", "import text", "import DICOM", "train LM (LoRA)", "train classifier",
                  "optimize LM", "optimize classifier", "TensorRT engine", "promote", "serve + requests",
                  "new records + retrain", "audit verify"):
        assert stage in rows, summary
    before, after = map(float, re.search(r"val loss (\d+\.\d+) -> (\d+\.\d+)", rows["train LM (LoRA)"]).groups())
    assert after < before
    assert re.search(r"PHI (\d+) values -> 0 found after import", rows["import DICOM"])
    assert "PHI check: 0 of" in out
    # Measured on every run: 24 patients always give a test split (splits cannot starve), and every
    # phantom patient has scans of both classes, so the test split has an AUC.
    assert re.search(r"test accuracy \d+\.\d%, AUC \d\.\d{3}", rows["train classifier"])
    # fp32 must match PyTorch. fp16 and int8 are checked on top-1 agreement over the held-out records, which
    # the vault's random site secret picks: where the tiny model has a near-tie, rounding flips it (4 of 68
    # positions under one secret, commit 35f1fa3), and the demo reports that variant as failed, not stored.
    assert re.search(r"parity [123]/3 ok", rows["optimize LM"]), rows["optimize LM"]
    assert re.search(r"parity [123]/3 ok", rows["optimize classifier"]), rows["optimize classifier"]
    assert len(re.findall(r"ONNX parity vs PyTorch: .*fp32 ok \(top-1", out)) == 2
    assert "skipped: no GPU/TensorRT, ONNX Runtime serves" in rows["TensorRT engine"] or "engines built" in \
        rows["TensorRT engine"]
    assert "site-qa-v1" in rows["promote"] and "phantom-ct-v1" in rows["promote"]

    # The server answered: a chat completion with text, and a label for each unseen scan.
    answer = re.search(r"chat  < (.+)  \(\d+ tokens", out)
    assert answer and answer.group(1).strip()
    assert re.search(r"the site's answer is the spindle bearing: (in the reply|not in the reply)", out)
    assert len(re.findall(r"classify patient9\d\d_\d\.dcm \(truly (normal|abnormal)\): (normal|abnormal) p=", out)) == 4
    assert re.search(r"ORT speedup chat x\d+\.\d\d", summary)

    decision = re.search(r"decision: (site-qa-v2 (rejected, production stays site-qa-v1|passed its gates: \w+))", out)
    assert decision, out
    assert "gate forgetting:" in out and "gate new_data:" in out
    assert re.search(r"chain intact, \d+ rows", rows["audit verify"])

    # What the demo left: a locked vault, no running job, no process (agent, server, job) for its home.
    home = work / "home"
    airlock = [str(BIN / "airlock")]
    env["AIRLOCK_HOME"] = str(home)
    jobs = json.loads(subprocess.run([*airlock, "jobs", "list", "--json"], capture_output=True, text=True, env=env,
                                     check=True).stdout)["jobs"]
    assert jobs and not [j["id"] for j in jobs if j["state"] in ("queued", "running")]
    assert {j["kind"] for j in jobs} >= {"data_import", "train", "optimize", "serve", "retrain"}
    status = json.loads(subprocess.run([*airlock, "vault", "status", "--json"], capture_output=True, text=True,
                                       env=env, check=True).stdout)
    assert status["state"] == "locked"
    # The demo waits for every job process and the key agent to exit before it returns, so this
    # holds at once; the wait is only a bound for a loaded machine, not a duration under test.
    deadline = time.monotonic() + 60
    while _processes_using(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_using(home) == []
    # A work folder given with --work-dir stays, and the summary says how to open the UI on it.
    assert f"open the operator UI on it: AIRLOCK_HOME={home}" in out
    assert not (work / "review").exists()  # the plaintext export of the PHI check is gone


def test_a_failing_stage_ends_the_demo_with_its_own_error(tmp_path: Path):
    """A vault already in the demo's home: stage 3's `vault init` refuses, and the demo says so and stops."""
    work = tmp_path / "demo"
    env = {**os.environ, "AIRLOCK_KDF_PROFILE": "test", "AIRLOCK_HOME": str(work / "home")}
    secret = tmp_path / "passphrase.txt"
    secret.write_text("an-earlier-vault-passphrase\n")
    secret.chmod(0o600)
    subprocess.run([str(BIN / "airlock"), "vault", "init", "--passphrase-file", str(secret)], capture_output=True,
                   env=env, cwd=REPO, timeout=120, check=True)
    env.pop("AIRLOCK_HOME")
    result = subprocess.run([str(BIN / "airlock"), "demo", "--skip-bundle", "--work-dir", str(work)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    error = result.stderr
    assert 'error: stage "vault init + unlock" failed: `airlock vault init --passphrase-file' in error, error
    assert "already has a vault" in error  # the command's own error ...
    assert "hint: use `airlock vault add-slot`" in error  # ... and its own hint, first
    assert "internal error" not in result.stdout + error
    assert "vault init + unlock  " in result.stdout and "FAILED" in result.stdout  # the summary's row
    assert "train LM" not in result.stdout  # nothing after the failed stage ran


def test_a_bug_in_a_stage_names_the_stage_and_where():
    report = Report()
    best_val_auc = None  # not measured: what once ended the demo with "internal error (TypeError at story.py:182)"
    with pytest.raises(TypeError) as raised, Stage(report, "train classifier", "4. train"):
        _ = f"best val AUC {best_val_auc:.3f}"
    error = stage_failed(report, raised.value)
    assert error.message.startswith('stage "train classifier" failed: unexpected TypeError in the demo')
    assert "test_demo.py:" in error.message
    assert "--debug" in error.hint
    assert [(s.stage, s.ok) for s in report.stages] == [("train classifier", False)]


def test_numbers_not_measured_are_said_so():
    assert format_metric(None) == "not measured"
    assert format_metric(float("nan"), "{:.1%}") == "not measured"
    assert format_metric(0.8125, "{:.1%}") == "81.2%"
    assert format_metric(1.5, "x{:.2f}") == "x1.50"
    # The new records can land with no test split: the new-data gate has no losses to show.
    gate = {"split": "site-qa@v2/test", "records": 0, "production_loss": None, "candidate_loss": None,
            "relative_change": None, "status": "not_applicable", "reason": "the new records have no test split yet"}
    assert _gate_line("new_data", gate) == ("gate new_data: site-qa@v2/test not_applicable (the new records have "
                                            "no test split yet)")
    measured = {**gate, "production_loss": 1.25, "candidate_loss": 1.0, "relative_change": -0.2, "status": "pass"}
    assert _gate_line("new_data", measured) == ("gate new_data: site-qa@v2/test test loss 1.2500 -> 1.0000 "
                                                "(-20.0%): pass")
