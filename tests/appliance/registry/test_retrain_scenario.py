"""The registry end to end on the tiny model, through the real CLI, vault, key agents and job processes.

One story, because each step needs the trained state of the one before (and training is the cost):
v1 is trained on maintenance Q&A and promoted by the admin; a scheduled run with the vault locked
is recorded as skipped; the scheduler (machine key) imports radiology summaries from the inbox and
retrains with replay, the gates pass and it auto-promotes v2 without A's test loss degrading; a
retrain without replay and with a high learning rate forgets A and is rejected, production stays
v2; the admin rolls back to v1; an operator may not promote; the card shows lineage and deltas.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import appliance
from appliance.catalog import open_catalog
from tests.appliance.registry.conftest import chats, cli_json, one_line_error, write_jsonl
from tests.conftest import fix_site_secret, run_cli

BOB = "bob keeps the presses running"


def _audit(action: str) -> list[dict]:
    """Audit rows of an action family, newest first (read straight from the catalog: cheaper than the CLI)."""
    from dataclasses import asdict

    from appliance.audit import iter_audit

    return [asdict(e) for e in iter_audit(open_catalog(), action=action, newest_first=True)]


def _version(version_id: str) -> dict:
    from appliance.registry.versions import get_version

    return get_version(open_catalog(), version_id).to_dict()


def _minutes(job) -> str:
    from datetime import datetime

    start, end = (datetime.fromisoformat(t.replace("Z", "+00:00")) for t in (job.started_at, job.finished_at))
    return f"{(end - start).total_seconds():.0f} s"


def test_gated_retraining_promotion_rollback_schedule_and_card(vault_init, unlock, passphrase_file, tiny_recipe,
                                                               tmp_path: Path, airlock_home: Path):
    from appliance.jobs.runner import wait_for
    from appliance.registry.versions import production
    from appliance.vault.lifecycle import keys_for
    from appliance.vault.store import read_bytes

    vault_init("--machine-key")
    unlock()
    fix_site_secret()  # the same splits, so the same losses and gate outcomes, on every run
    bob_file = tmp_path / "bob.txt"
    bob_file.write_text(BOB + "\n")
    added = run_cli("users", "add", "bob", "--role", "operator", "--passphrase-file", str(bob_file),
                    "--admin-passphrase-file", str(passphrase_file))
    assert added.returncode == 0, added.stderr
    maintenance, radiology = chats("maintenance"), chats("radiology")
    half = len(radiology) // 2

    # --- v1: maintenance Q&A (domain A), trained with --task, so it registers itself as a candidate.
    source = write_jsonl(tmp_path / "a", "maint.jsonl", maintenance)
    assert run_cli("data", "import", str(source), "--name", "maint", "--near-dup", "off").returncode == 0
    trained = cli_json("train", "lm", "--base", "tiny-deepseek-r1", "--data", "maint", "--recipe", str(tiny_recipe),
                       "--task", "maint-qa", "--wait", "--json")
    assert trained["job"]["result"]["version"] == "maint-qa-v1"
    v1 = cli_json("models", "show", "maint-qa-v1", "--json")["version"]
    run = trained["run"]
    shown = cli_json("data", "show", "maint", "--json")
    assert v1["state"] == "candidate" and v1["parent_id"] is None and v1["run_id"] == run["id"]
    assert (v1["base_model"], v1["base_hash"], v1["recipe_hash"]) == (run["base_model"], run["base_hash"],
                                                                       run["recipe_hash"])
    assert v1["dataset_versions"] == [{"dataset_id": shown["dataset"]["id"], "name": "maint", "version": 1,
                                       "content_hash": shown["versions"][0]["content_hash"]}]
    assert v1["code_version"] == appliance.__version__
    assert {g["status"] for g in v1["gates"].values()} == {"not_evaluated"}
    db = open_catalog()
    adapter = read_bytes(db, keys_for(db, airlock_home), airlock_home, run["artifact"], "adapter.safetensors")
    assert v1["artifacts"]["adapter"] == {"object": run["artifact"], "file": "adapter.safetensors",
                                          "sha256": hashlib.sha256(adapter).hexdigest(), "bytes": len(adapter)}
    promoted = cli_json("models", "promote", "maint-qa-v1", "--reason", "first model, card reviewed", "--json")
    assert promoted["promoted"]["state"] == "production" and promoted["replaced"] is None
    assert production(db, "maint-qa").id == "maint-qa-v1"

    # --- a schedule with an inbox and auto-promotion; with the vault locked the due run is skipped, on record.
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    # Replay: half of each retrain's mix is earlier records. At the default 20% the tiny model's A test loss
    # rose 3.5-6.6% in our runs (before the split was fixed): too close to the 5% gate for a test. At 50%,
    # with the fixed site secret, it rises 2.1% (the same on every run): 2.9 points below the gate.
    made = cli_json("schedule", "set", "maint-qa", "--every", "1d", "--inbox", str(inbox), "--min-new-records", "20",
                    "--replay", "0.5", "--auto-promote", "--json")["schedule"]
    write_jsonl(inbox, "radiology-1.jsonl", radiology[:half])
    (inbox / "broken.jsonl").write_text('{"messages": [oops\nnot json at all\n', encoding="utf-8")
    assert run_cli("vault", "lock").returncode == 0
    locked = run_cli("schedule", "run-due")
    assert locked.returncode == 1, locked.stderr
    assert "maint-qa: skipped: vault locked" in locked.stdout
    assert "hint: unlock first: `airlock vault unlock --machine-key`" in locked.stderr
    listed = cli_json("schedule", "list", "--json")["schedules"]
    assert [(s["task"], s["auto_promote"], s["last_runs"][0]["outcome"], s["last_runs"][0]["reason"])
            for s in listed] == [("maint-qa", True, "skipped", "vault locked")]
    assert [e["details"]["reason"] for e in _audit("schedule.skipped")] == ["vault locked"]
    assert listed[0]["next_due_at"] == made["next_due_at"]  # a skipped run stays due
    no_key = cli_json("schedule", "run-due", "--machine-key-file", str(tmp_path / "nope.key"), "--json", rc=1)
    assert no_key["runs"][0]["outcome"] == "skipped"
    assert no_key["runs"][0]["reason"].startswith("vault locked (machine key: ")
    assert sorted(p.name for p in inbox.iterdir()) == ["broken.jsonl", "radiology-1.jsonl"]  # nothing imported

    # --- the timer's command: unlock as the scheduler (machine key), import the inbox, retrain with replay;
    # the gates pass and the version is auto-promoted.
    due = cli_json("schedule", "run-due", "--machine-key", "--json")["runs"]
    assert [r["outcome"] for r in due] == ["started"] and due[0]["records_imported"] > 20
    job = wait_for(db, due[0]["job_id"], timeout_s=600)
    assert job.state == "succeeded", (job.error, job.hint)
    assert job.result["version"] == "maint-qa-v2" and job.result["promoted"] is True
    assert (inbox / "processed" / "radiology-1.jsonl").is_file()
    assert (inbox / "rejected" / "broken.jsonl").is_file()
    assert "nothing to import" in (inbox / "rejected" / "broken.jsonl.reason.txt").read_text()
    v2 = _version("maint-qa-v2")
    assert v2["state"] == "production" and v2["parent_id"] == "maint-qa-v1"
    assert [d["version"] for d in v2["dataset_versions"]] == [1, 2]
    forgetting, new_data = v2["gates"]["forgetting"], v2["gates"]["new_data"]
    [on_a] = forgetting["splits"]
    assert on_a["split"] == "maint@v1/test" and on_a["status"] == "pass" and forgetting["status"] == "pass"
    assert on_a["relative_change"] <= 0.05  # A's test loss did not degrade beyond the task's threshold
    # B's test loss (6 records) measured 0.2878 -> 0.2829 (-1.7%): 2.7 points inside the gate's 1% tolerance,
    # and 1.7% below production's, which the next line asks for.
    assert new_data["split"] == "maint@v2/test" and new_data["status"] == "pass"
    assert new_data["candidate_loss"] < new_data["production_loss"]  # it learned the new domain
    assert v2["gates"]["engine_parity"]["status"] == "not_applicable"
    assert v2["reasons"] == []
    retrain_run = cli_json("train", "show", v2["run_id"], "--json")["run"]
    mix = retrain_run["lineage"]["records"]
    # Replay is half of the mix, capped by the earlier train records (the keyed hash split varies per vault).
    assert mix["replay_train"] == min(mix["new_train"], mix["earlier_train"]) > 0
    assert retrain_run["lineage"]["retrain"] == {"parent": "maint-qa-v1", "init": "production", "replay": 0.5,
                                                 "replay_seed": 3, "since_version": 1}
    assert _version("maint-qa-v1")["state"] == "retired"
    auto = _audit("models.promote")[0]
    assert auto["object"] == "maint-qa-v2" and auto["actor"].startswith("scheduler [scheduler]")
    assert "auto-promote" in auto["details"]["reason"] and auto["details"]["replaced"] == "maint-qa-v1"
    print(f"\nv2 gates: A {on_a['production_loss']:.4f} -> {on_a['candidate_loss']:.4f} "
          f"({on_a['relative_change']:+.2%}); B {new_data['production_loss']:.4f} -> "
          f"{new_data['candidate_loss']:.4f} ({new_data['relative_change']:+.2%})")

    # --- a retrain that forgets: no replay, the highest learning rate, on more radiology data -> rejected.
    source = write_jsonl(tmp_path / "b2", "radiology-2.jsonl", radiology[half:])
    assert run_cli("data", "import", str(source), "--name", "maint", "--near-dup", "off").returncode == 0
    bad = cli_json("retrain", "maint-qa", "--replay", "0", "--lr", "1e-2", "--wait", "--json", rc=1)
    v3 = bad["version"]
    assert v3["id"] == "maint-qa-v3" and v3["state"] == "rejected" and v3["parent_id"] == "maint-qa-v2"
    splits = {s["split"]: s for s in v3["gates"]["forgetting"]["splits"]}
    assert set(splits) == {"maint@v1/test", "maint@v2/test"}  # every earlier frozen test split
    # Measured +84% (0.964 -> 1.770) with the fixed site secret: far beyond the 5% gate.
    assert splits["maint@v1/test"]["status"] == "fail" and splits["maint@v1/test"]["relative_change"] > 0.05
    assert any(r.startswith("forgetting: maint@v1/test test loss") for r in v3["reasons"])
    assert bad["run"]["lineage"]["records"]["replay_train"] == 0
    assert production(db, "maint-qa").id == "maint-qa-v2"  # production untouched
    assert [e["object"] for e in _audit("models.reject")] == ["maint-qa-v3"]
    print(f"v3 gates: A {splits['maint@v1/test']['production_loss']:.4f} -> "
          f"{splits['maint@v1/test']['candidate_loss']:.4f} ({splits['maint@v1/test']['relative_change']:+.2%})")
    refused = one_line_error(run_cli("models", "promote", "maint-qa-v3"))
    assert "maint-qa-v3 is rejected and cannot be promoted: forgetting:" in refused

    # --- the admin rolls back: v1 serves again; the audit log has both promotions and the rollback, who and why.
    assert run_cli("vault", "lock").returncode == 0
    unlock("--user", "admin", "--passphrase-file", str(passphrase_file))
    rolled = cli_json("models", "rollback", "maint-qa", "--reason", "v2 misread a <b>report</b>", "--json")
    assert (rolled["restored"]["id"], rolled["retired"]["id"]) == ("maint-qa-v1", "maint-qa-v2")
    assert production(db, "maint-qa").id == "maint-qa-v1"
    promotions = [(e["object"], e["actor"].split(" (")[0], e["details"]["reason"]) for e in _audit("models.promote")]
    assert promotions[1] == ("maint-qa-v1", "admin", "first model, card reviewed")
    assert promotions[0][:2] == ("maint-qa-v2", "scheduler [scheduler]")
    [back] = _audit("models.rollback")
    assert back["object"] == "maint-qa" and back["actor"].startswith("admin (os:")
    assert back["details"] == {"reason": "v2 misread a <b>report</b>", "restored": "maint-qa-v1",
                               "retired": "maint-qa-v2"}
    nothing_left = one_line_error(run_cli("models", "rollback", "maint-qa"))
    assert "maint-qa-v1 was the first production version of maint-qa" in nothing_left

    # --- an operator may register and read, never promote, roll back or loosen the gates.
    assert run_cli("vault", "lock").returncode == 0
    unlock("--user", "bob", "--passphrase-file", str(bob_file))
    for command in (["models", "promote", "maint-qa-v2"], ["models", "rollback", "maint-qa"],
                    ["models", "policy", "maint-qa", "--max-forgetting", "0.5"],
                    ["schedule", "set", "maint-qa", "--every", "1h"]):
        assert "needs the admin role; bob is operator" in one_line_error(run_cli(*command))
    assert "no task named 'nope'" in one_line_error(run_cli("retrain", "nope"))
    assert "no model version 'nope'" in one_line_error(run_cli("models", "card", "nope"))
    assert production(db, "maint-qa").id == "maint-qa-v1"

    # --- the card: lineage as a tree, metric deltas per test split, gates; no record contents; HTML escaped.
    card = run_cli("models", "card", "maint-qa-v2")
    assert card.returncode == 0, card.stderr
    text = card.stdout
    for expected in ("# Model card: maint-qa-v2", "## Intended use", "## Base model", "## Data", "## Training recipe",
                     "## Metrics", "## Gates", "## Quantization and engines", "## Known limits", "## Lineage",
                     "maint-qa-v1 [production]", "└── maint-qa-v2 [retired]", "<- this card",
                     "    └── maint-qa-v3 [rejected]", "| forgetting: maint@v1/test |", "| new data: maint@v2/test |",
                     f"sha256 {v2['recipe_hash']}".replace("sha256", "SHA-256"), v2["base_hash"],
                     "EWC: off (lambda 0).", "previous production (maint-qa-v1)"):
        assert expected in text, expected
    assert f"{on_a['relative_change'] * 100:+.1f}%" in text
    answer = json.loads(radiology[0])["messages"][1]["content"].split("</think>")[-1].strip()
    question = json.loads(maintenance[0])["messages"][0]["content"]
    assert answer not in text and question not in text
    out = tmp_path / "card.html"
    assert run_cli("models", "card", "maint-qa-v1", "--html", str(out)).returncode == 0
    page = out.read_text()
    assert "v2 misread a &lt;b&gt;report&lt;/b&gt;" in page and "<b>report</b>" not in page
    diff = cli_json("models", "diff", "maint-qa-v1", "maint-qa-v2", "--json")
    assert diff["changed"]["dataset_versions"]["b"][-1][:2] == ["maint", 2]
    # The retrain's steps scale with its mix of new + replayed records, so they may happen to equal v1's.
    steps = diff["recipe"].get("max_steps")
    assert steps is None or (steps["a"] == 12 and steps["b"] != 12)

    # Nothing of the records reached the audit log, and the chain holds.
    audit_text = json.dumps(_audit(""))
    assert answer not in audit_text and question not in audit_text
    assert run_cli("audit", "verify").returncode == 0
    from appliance.jobs.records import list_jobs

    print("jobs: " + ", ".join(f"{j.kind} {_minutes(j)}" for j in reversed(list_jobs(db, limit=20))
                               if j.finished_at and j.started_at))
