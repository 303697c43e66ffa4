"""Versions, promotion, rollback, deletion, policy, cards and due schedules on a real catalog.

The runs behind the versions are written with the training code's own row functions (no job
process and no weights: these tests are about the registry's rows, transactions and audit)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from appliance.audit import iter_audit, verify_chain
from appliance.catalog import open_catalog
from appliance.registry import promotion, schedule
from appliance.registry.card import card_blocks, diff_versions, to_html, to_markdown
from appliance.registry.versions import (
    ModelVersion,
    RegistryError,
    add_artifact,
    ensure_task,
    get_version,
    insert_version,
    list_versions,
    not_evaluated_gates,
    now,
    production,
    promotions,
    set_policy,
)

ADMIN = "admin (os:test)"


@pytest.fixture
def db(airlock_home):
    return open_catalog()


def _run(db, run_id: str, *, dataset_id: str = "ds-maint-0001"):
    from appliance.data import datasets
    from appliance.data.datasets import Dataset
    from appliance.jobs.records import create_job
    from appliance.train import runs

    if datasets.find(db, "maint") is None:
        datasets.insert(db, Dataset(dataset_id, "maint", "text", "general", "seed", "80/10/10", "active", now(),
                                    "tester"))
    job = create_job(db, "train", {"run": run_id}, actor="tester")  # a row only: nothing is launched
    run = runs.Run(run_id, "lm", None, job.id, "tiny-deepseek-r1", "b" * 64, dataset_id, "maint", 1, "c" * 64,
                   {"lr": 0.003, "max_steps": 20}, "r" * 64, "succeeded", {"val_loss": 0.9, "test": {"loss": 0.8}},
                   {}, f"run-{run_id}", None, now(), now(), now(), "tester")
    runs.insert_run(db, run)
    return run


def _version(db, task: str, number: int, *, parent: str | None = None, state: str = "candidate",
             reasons: tuple[str, ...] = (), val_loss: float = 0.9) -> ModelVersion:
    run = _run(db, f"lm-{task}-{number}")
    ensure_task(db, task, run, actor=ADMIN)
    return insert_version(db, ModelVersion(
        f"{task}-v{number}", task, "lm", number, state, run.id, parent, run.base_model, run.base_hash,
        [{"dataset_id": run.dataset_id, "name": "maint", "version": 1, "content_hash": "c" * 64}], run.recipe_hash,
        "0.1.0", {"val_loss": val_loss, "test": {"loss": val_loss - 0.1, "perplexity": 2.0}},
        {"adapter": {"object": run.artifact, "file": "adapter.safetensors", "sha256": "a" * 64, "bytes": 10}},
        now(), ADMIN, not_evaluated_gates("test"), list(reasons), now()))


def _actions(db, prefix: str) -> list[tuple[str, str]]:
    return [(e.action, e.object) for e in iter_audit(db, action=prefix)]  # oldest first


def test_exactly_one_production_version_per_task_is_enforced_by_the_catalog(db):
    v1, v2 = _version(db, "maint-qa", 1), _version(db, "maint-qa", 2)
    other = _version(db, "other", 1)
    promotion.promote(db, v1.id, actor=ADMIN, reason="first")
    promotion.promote(db, other.id, actor=ADMIN, reason="another task has its own")
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        db.execute("UPDATE model_versions SET state = 'production' WHERE id = ?", [v2.id])
    assert production(db, "maint-qa").id == v1.id and production(db, "other").id == other.id
    assert production(db, "nothing") is None
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        db.execute("UPDATE model_versions SET state = 'shipped' WHERE id = ?", [v2.id])


def test_promote_and_rollback_walk_the_production_history_back(db):
    v1, v2, v3 = (_version(db, "maint-qa", n) for n in (1, 2, 3))
    promotion.promote(db, v1.id, actor=ADMIN, reason="r1")
    promoted, replaced = promotion.promote(db, v2.id, actor=ADMIN, reason="r2")
    assert (promoted.state, replaced.id, get_version(db, v1.id).state) == ("production", v1.id, "retired")
    promotion.promote(db, v3.id, actor="scheduler [scheduler]", reason="gates passed")

    restored, retired = promotion.rollback(db, "maint-qa", actor=ADMIN, reason="v3 misbehaves")
    assert (restored.id, retired.id) == (v2.id, v3.id)
    restored, retired = promotion.rollback(db, "maint-qa", actor=ADMIN, reason="v2 too")
    assert (restored.id, retired.id) == (v1.id, v2.id)
    with pytest.raises(RegistryError, match="maint-qa-v1 was the first production version of maint-qa"):
        promotion.rollback(db, "maint-qa", actor=ADMIN)
    assert production(db, "maint-qa").id == v1.id
    assert [(p["action"], p["version"], p["previous"], p["reason"]) for p in promotions(db, "maint-qa")] == [
        ("promote", v1.id, None, "r1"), ("promote", v2.id, v1.id, "r2"), ("promote", v3.id, v2.id, "gates passed"),
        ("rollback", v2.id, v3.id, "v3 misbehaves"), ("rollback", v1.id, v2.id, "v2 too")]
    assert _actions(db, "models.") == [
        ("models.task_create", "maint-qa"), ("models.register", v1.id), ("models.register", v2.id),
        ("models.register", v3.id), ("models.promote", v1.id), ("models.promote", v2.id), ("models.promote", v3.id),
        ("models.rollback", "maint-qa"), ("models.rollback", "maint-qa")]
    rows = [e for e in iter_audit(db, action="models.") if e.action in ("models.promote", "models.rollback")]
    assert rows[-1].details == {"reason": "v2 too", "restored": v1.id, "retired": v2.id} and rows[-1].actor == ADMIN
    assert rows[2].actor == "scheduler [scheduler]" and rows[2].details["replaced"] == v2.id
    assert verify_chain(db).ok

    # A retired version can be promoted again by hand; rollback then goes back to what it replaced.
    promotion.promote(db, v3.id, actor=ADMIN, reason="fixed upstream")
    assert promotion.rollback(db, "maint-qa", actor=ADMIN)[0].id == v1.id


def test_refusals_leave_production_untouched(db, airlock_home):
    v1 = _version(db, "maint-qa", 1)
    v2 = _version(db, "maint-qa", 2, parent=v1.id, state="rejected", reasons=("forgetting: maint@v1/test +9%",))
    v3 = _version(db, "maint-qa", 3, parent=v1.id)
    with pytest.raises(RegistryError, match="has no production version to roll back"):
        promotion.rollback(db, "maint-qa", actor=ADMIN)
    promotion.promote(db, v1.id, actor=ADMIN)
    with pytest.raises(RegistryError, match=r"maint-qa-v2 is rejected and cannot be promoted: forgetting: "):
        promotion.promote(db, v2.id, actor=ADMIN)
    with pytest.raises(RegistryError, match="already in production"):
        promotion.promote(db, v1.id, actor=ADMIN)
    with pytest.raises(RegistryError, match="production of maint-qa changed"):
        promotion.promote(db, v3.id, actor=ADMIN, expect_production="maint-qa-v9")
    with pytest.raises(RegistryError, match="is in production and cannot be deleted"):
        promotion.delete_version(db, airlock_home, v1.id, actor=ADMIN)
    assert production(db, "maint-qa").id == v1.id
    assert [v.state for v in list_versions(db, task="maint-qa")] == ["production", "rejected", "candidate"]


def test_delete_keeps_the_row_for_lineage(db, airlock_home):
    v1 = _version(db, "maint-qa", 1)
    v2 = _version(db, "maint-qa", 2, parent=v1.id, state="rejected", reasons=("forgetting",))
    deleted = promotion.delete_version(db, airlock_home, v2.id, actor=ADMIN)
    assert deleted.state == "deleted" and deleted.parent_id == v1.id
    with pytest.raises(RegistryError, match="already deleted"):
        promotion.delete_version(db, airlock_home, v2.id, actor=ADMIN)
    with pytest.raises(RegistryError, match="deleted and cannot be promoted"):
        promotion.promote(db, v2.id, actor=ADMIN)
    [row] = [e for e in iter_audit(db, action="models.delete")]
    assert row.details == {"task": "maint-qa", "from": "rejected", "objects": [v2.artifacts["adapter"]["object"]]}


def test_policy_and_artifacts_are_audited_and_bounded(db):
    v1 = _version(db, "maint-qa", 1)
    task = set_policy(db, "maint-qa", actor=ADMIN, max_forgetting=0.02, auto_promote=True, new_data_tolerance=None)
    assert (task.max_forgetting, task.auto_promote, task.new_data_tolerance) == (0.02, True, 0.01)
    [row] = list(iter_audit(db, action="models.policy"))
    assert row.details == {"before": {"auto_promote": False, "max_forgetting": 0.05},
                           "after": {"auto_promote": True, "max_forgetting": 0.02}}
    with pytest.raises(RegistryError, match=r"max-forgetting 2 is outside 0\.\.1"):
        set_policy(db, "maint-qa", actor=ADMIN, max_forgetting=2)
    with pytest.raises(RegistryError, match="no task named 'nope'"):
        set_policy(db, "nope", actor=ADMIN, auto_promote=True)
    engine = {"object": "opt-1", "file": "model.plan", "sha256": "e" * 64, "sm": "9.0", "tensorrt": "10.9"}
    updated = add_artifact(db, v1.id, "engine", engine, actor=ADMIN)
    assert updated.artifacts["engine"] == engine and "adapter" in updated.artifacts
    with pytest.raises(RegistryError, match="task name 'Bad Name' is not allowed"):
        ensure_task(db, "Bad Name", _run(db, "lm-x"), actor=ADMIN)


def test_card_lineage_deltas_and_escaping(db):
    v1 = _version(db, "maint-qa", 1, val_loss=0.9)
    v2 = _version(db, "maint-qa", 2, parent=v1.id, val_loss=0.8)
    _version(db, "maint-qa", 3, parent=v2.id, state="rejected", reasons=("forgetting: x | y",))
    _version(db, "maint-qa", 4, parent=v1.id)
    promotion.promote(db, v1.id, actor=ADMIN, reason="<script>alert(1)</script>")
    markdown = to_markdown(card_blocks(db, v2.id))
    assert "\n".join(line for line in markdown.splitlines() if "maint-qa-v" in line and "[" in line) == (
        "maint-qa-v1 [production] run lm-maint-qa-1; data up to maint v1\n"
        "├── maint-qa-v2 [candidate] run lm-maint-qa-2; data up to maint v1   <- this card\n"
        "│   └── maint-qa-v3 [rejected] run lm-maint-qa-3; data up to maint v1\n"
        "└── maint-qa-v4 [candidate] run lm-maint-qa-4; data up to maint v1")
    assert "| val loss | 0.8000 | 0.9000 | -0.1000 |" in markdown
    assert "| metric | this version | previous production (maint-qa-v1) | delta |" in markdown
    assert "Gates were not evaluated" in markdown
    rejected = to_markdown(card_blocks(db, "maint-qa-v3"))
    assert "- rejected: forgetting: x | y" in rejected
    page = to_html(card_blocks(db, v1.id))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    assert page.startswith("<!DOCTYPE html>") and page.count("<table>") == page.count("</table>")

    diff = diff_versions(db, v1.id, v2.id)
    assert diff["changed"]["parent_id"] == {"a": None, "b": v1.id}
    assert diff["metrics"]["val loss"] == {"a": 0.9, "b": 0.8, "delta": pytest.approx(-0.1)}
    assert diff["recipe"] == {}


def test_due_schedules_with_the_vault_locked_are_recorded_as_skipped_and_stay_due(db, airlock_home, tmp_path):
    _version(db, "maint-qa", 1)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "new.jsonl").write_text('{"text": "press 4: seal replaced"}\n')
    made = schedule.set_schedule(db, "maint-qa", actor=ADMIN, every="7d", inbox=inbox, min_new_records=5)
    assert made.inbox == str(inbox.resolve()) and made.every_s == 7 * 86400
    later = schedule.set_schedule(db, "maint-qa", actor=ADMIN, cron="30 2 * * 1")
    assert later.cron == "30 2 * * 1" and later.every_s is None and later.inbox is None
    due_at = datetime.fromisoformat(later.next_due_at.replace("Z", "+00:00"))
    assert due_at > datetime.now(UTC) and due_at.weekday() == 0 and (due_at.hour, due_at.minute) == (2, 30)

    assert schedule.run_due(db, airlock_home) == []  # not due yet: nothing happens, nothing recorded
    runs = schedule.run_due(db, airlock_home, now=due_at + timedelta(minutes=1))
    assert [(r.task, r.outcome, r.reason) for r in runs] == [("maint-qa", "skipped", "vault locked")]
    assert "airlock vault unlock --machine-key" in runs[0].hint
    again = schedule.run_due(db, airlock_home, now=due_at + timedelta(hours=1))  # still due: skipped again
    assert [r.outcome for r in again] == ["skipped"]
    assert schedule.get_schedule(db, "maint-qa").next_due_at == later.next_due_at
    assert [r["outcome"] for r in schedule.last_runs(db, "maint-qa")] == ["skipped", "skipped"]
    assert [e.details["reason"] for e in iter_audit(db, action="schedule.skipped")] == ["vault locked"] * 2
    assert (inbox / "new.jsonl").exists()  # nothing was imported while locked
    forced = schedule.run_due(db, airlock_home, task="maint-qa", force=True)
    assert [r.outcome for r in forced] == ["skipped"]
    with pytest.raises(RegistryError, match="has no schedule"):
        schedule.run_due(db, airlock_home, task="other")
    from appliance.registry.cron import ScheduleSpecError

    with pytest.raises(ScheduleSpecError, match="exactly one of --every and --cron"):
        schedule.set_schedule(db, "maint-qa", actor=ADMIN, every="1d", cron="0 0 * * *")
    with pytest.raises(RegistryError, match="is not a folder"):
        schedule.set_schedule(db, "maint-qa", actor=ADMIN, every="1d", inbox=tmp_path / "missing")


def test_register_hashes_the_decrypted_adapter_and_refuses_twice(db, airlock_home):
    import hashlib

    from appliance.registry.versions import check_run_fits_task, register_run
    from appliance.train.artifacts import ADAPTER, save_artifact
    from appliance.train.runs import finish_run
    from appliance.vault.keys import LocalKeys
    from appliance.vault.keyslots import passphrase_kdf
    from appliance.vault.lifecycle import Credential, init_vault, open_root

    init_vault(db, "registry pass phrase", passphrase_kdf())
    keys = LocalKeys(open_root(db, Credential.passphrase("registry pass phrase"))[1])
    run = _run(db, "lm-real")
    adapter = b"adapter weights stand-in " * 40
    save_artifact(db, keys, airlock_home, run.id, {ADAPTER: adapter})
    version = register_run(db, keys, airlock_home, run, "maint-qa", actor=ADMIN)
    assert (version.id, version.state, version.parent_id) == ("maint-qa-v1", "candidate", None)
    assert version.artifacts == {"adapter": {"object": f"run-{run.id}", "file": ADAPTER,
                                             "sha256": hashlib.sha256(adapter).hexdigest(), "bytes": len(adapter)}}
    with pytest.raises(RegistryError, match="is already registered as maint-qa-v1"):
        register_run(db, keys, airlock_home, run, "maint-qa", actor=ADMIN)
    promotion.promote(db, version.id, actor=ADMIN)

    second = _run(db, "lm-second")
    save_artifact(db, keys, airlock_home, second.id, {ADAPTER: adapter + b"!"})
    assert register_run(db, keys, airlock_home, second, "maint-qa", actor=ADMIN).parent_id == version.id

    failed = finish_run(db, _run(db, "lm-failed").id, "failed", error="boom")
    with pytest.raises(RegistryError, match="is failed and has no trained weights to register"):
        register_run(db, keys, airlock_home, failed, "maint-qa", actor=ADMIN)
    with pytest.raises(RegistryError, match="task 'maint-qa' holds lm models trained on dataset ds-maint-0001"):
        check_run_fits_task(db, "maint-qa", "classifier", "ds-maint-0001")
    check_run_fits_task(db, "new-task", "classifier", "ds-other")  # a new task fits anything
