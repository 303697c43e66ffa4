"""`airlock train lm` as a real detached job over a real encrypted dataset: it learns, records its
lineage, leaves only ciphertext on disk, and survives kill -9 and SIGTERM with an exact resume."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from appliance.catalog import open_catalog
from tests.appliance.train.conftest import cli_json, corpus_chats, read_scalars
from tests.conftest import files_holding, run_cli

# Resuming replays the same data order, optimizer, schedule and RNG state in a new process on the
# same machine: only float noise may differ (observed: none; bit-identical on CPU).
RESUME_REL_TOLERANCE = 1e-5


def _train(recipe: Path, *extra: str) -> dict:
    return cli_json("train", "lm", "--base", "tiny-deepseek-r1", "--data", "qa", "--recipe", str(recipe), *extra)


def test_train_lm_job_learns_records_lineage_and_stores_only_ciphertext_then_resumes_exactly(qa_dataset, tiny_recipe,
                                                                                             airlock_home, tmp_path):
    """One uninterrupted run, checked, is then the reference of the same run killed and resumed (one training
    fewer than a reference of its own: the two runs take the same inputs)."""
    straight = _check_straight_run(tiny_recipe, airlock_home)
    _check_kill_9_and_sigterm_then_resume_end_exactly_like(straight, tiny_recipe, tmp_path)


def _check_straight_run(tiny_recipe: Path, airlock_home: Path) -> dict:
    from appliance.base_models import generate_text, resolve_base_model
    from appliance.train.artifacts import load_eval_samples, load_lm_adapter
    from appliance.train.fingerprints import base_model_hash, recipe_hash
    from appliance.train.inputs import check_pinned, text_splits
    from appliance.train.lm import encode_records, evaluate_loss, make_batches
    from appliance.train.recipe import recipe_from_dict
    from appliance.train.runs import get_run
    from appliance.vault.lifecycle import keys_for

    out = _train(tiny_recipe, "--wait", "--json")
    run, job = out["run"], out["job"]
    assert job["state"] == "succeeded" and run["state"] == "succeeded", (job["error"], job["hint"])
    metrics = run["metrics"]
    print(f"\nval loss: base {metrics['initial_val_loss']:.4f}, first eval {metrics['val_losses'][0][1]:.4f}, "
          f"last {metrics['val_loss']:.4f}")
    assert metrics["steps"] == metrics["total_steps"] == 24
    # Measured with the fixed site secret: base 0.812, first evaluation 0.684, last 0.563 (18% and 31% lower).
    assert metrics["val_loss"] < metrics["val_losses"][0][1]      # better than its first evaluation ...
    assert metrics["val_loss"] < metrics["initial_val_loss"]      # ... and than the untouched base model
    assert [s for s, _ in metrics["val_losses"]] == [4, 8, 12, 16, 20, 24]
    assert metrics["test"]["label_tokens"] > 0 and metrics["records"]["train"] > 0
    assert metrics["planned_memory_mb"] > 0 and metrics["peak_memory_mb"] > 0  # planned beside measured

    # Lineage: the pinned dataset version's content hash, the base model's and the recipe's hashes.
    shown = cli_json("data", "show", "qa", "--json")
    assert (run["dataset_version"], run["dataset_hash"]) == (1, shown["versions"][0]["content_hash"])
    assert run["dataset_id"] == shown["dataset"]["id"]
    base = resolve_base_model("tiny-deepseek-r1")
    assert run["base_hash"] == base_model_hash(base.path)
    assert run["recipe"]["max_steps"] == 24 and run["recipe_hash"] == recipe_hash(run["recipe"])
    assert run["artifact"] == f"run-{run['id']}"
    assert cli_json("train", "runs", "--json")["runs"] == [run]
    assert cli_json("train", "show", run["id"], "--json")["run"] == run
    db = open_catalog()
    actions = [r[0] for r in db.execute("SELECT action FROM audit_log WHERE object = ? ORDER BY seq", [run["id"]])]
    assert actions == ["train.create", "train.start", "train.finish"]

    # Only ciphertext at rest: no safetensors header, tensor names or record text anywhere under AIRLOCK_HOME.
    answer = json.loads(corpus_chats(1)[0])["messages"][1]["content"].split("</think>")[-1].strip()
    assert files_holding(airlock_home, b'{"__metadata__"', b"lora_A", answer.encode()) == []
    kinds = {r[0]: r[1] for r in db.execute("SELECT object_id, kind FROM vault_deks WHERE state = 'active'")}
    assert kinds[run["artifact"]] == "model"
    assert [o for o, k in kinds.items() if k == "token-cache"]
    assert f"ckpt-{run['id']}" not in kinds  # the checkpoint is shredded once the adapter is stored

    # The adapter loads back through the vault into peft, reproduces the run's validation loss, and generates.
    keys = keys_for(db, airlock_home)
    stored = get_run(db, run["id"])
    model, tokenizer = load_lm_adapter(db, keys, airlock_home, stored)
    pinned = check_pinned(db, stored.dataset_id, stored.dataset_name, stored.dataset_version, stored.dataset_hash)
    recipe = recipe_from_dict(stored.recipe)
    val = make_batches(encode_records(tokenizer, text_splits(db, keys, airlock_home, pinned)["val"],
                                      recipe.max_length, "val"), recipe, tokenizer.pad_token_id, order_seed=None)
    assert evaluate_loss(model, val, "cpu", None) == pytest.approx(metrics["val_loss"], rel=1e-5)
    with model.disable_adapter():
        assert evaluate_loss(model, val, "cpu", None) == pytest.approx(metrics["initial_val_loss"], rel=1e-5)
    reply = generate_text(model, tokenizer, "The compressor C2 shows intermittent stop. What should I check first?",
                          chat=True, max_new_tokens=24)
    assert reply.strip()
    assert len(load_eval_samples(db, keys, airlock_home, stored)) == 4
    db.close()
    return run


def _job_events(db, job_id: str, after: int = 0) -> list[tuple[int, str, dict]]:
    rows = db.execute("SELECT id, kind, data FROM job_events WHERE job_id = ? AND id > ? ORDER BY id", [job_id, after])
    return [(r[0], r[1], json.loads(r[2])) for r in rows]


def _wait_for_progress(db, job_id: str, after: int, predicate, timeout_s: float = 180) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event_id, kind, data in _job_events(db, job_id, after):
            if kind == "progress" and "step" in data and predicate(data):
                return event_id, data
        time.sleep(0.02)
    raise AssertionError(f"no such progress event from {job_id} within {timeout_s} s")


def _check_kill_9_and_sigterm_then_resume_end_exactly_like(straight: dict, tiny_recipe: Path, tmp_path: Path) -> None:
    from appliance.jobs.runner import wait_for

    started = _train(tiny_recipe, "--json")  # detached: returns at once
    run_id, job_id = started["run"]["id"], started["job"]["id"]
    db = open_catalog()
    # A checkpoint is written at every evaluation (every 4 steps), before the progress event that reports it.
    _wait_for_progress(db, job_id, 0, lambda d: d.get("val_loss") is not None)
    pid = db.execute("SELECT pid FROM jobs WHERE id = ?", [job_id]).fetchone()[0]
    os.kill(pid, signal.SIGKILL)
    killed_at = max(d["step"] for _, k, d in _job_events(db, job_id) if k == "progress" and "step" in d)
    assert killed_at < 24, "the job finished before it could be killed"

    listed = {j["id"]: j for j in cli_json("jobs", "list", "--json")["jobs"]}
    deadline = time.monotonic() + 30
    while listed[job_id]["state"] == "running" and time.monotonic() < deadline:  # the kernel reaps it first
        time.sleep(0.1)
        listed = {j["id"]: j for j in cli_json("jobs", "list", "--json")["jobs"]}
    assert listed[job_id]["state"] == "interrupted"
    assert cli_json("train", "show", run_id, "--json")["run"]["state"] == "interrupted"

    # kill -9 -> `airlock jobs resume`: it continues right after a checkpoint, not from step 1.
    mark = _job_events(db, job_id)[-1][0]
    resumed = run_cli("jobs", "resume", job_id)
    assert resumed.returncode == 0, resumed.stderr
    _, first = _wait_for_progress(db, job_id, mark, lambda d: True)
    assert first["step"] > 1 and (first["step"] - 1) % 4 == 0 and first["step"] <= killed_at + 1

    # SIGTERM (what `airlock jobs cancel` sends; sent here directly, to land mid-training) -> it checkpoints
    # and ends cancelled ...
    os.kill(db.execute("SELECT pid FROM jobs WHERE id = ?", [job_id]).fetchone()[0], signal.SIGTERM)
    job = wait_for(db, job_id, timeout_s=180)
    assert job.state == "cancelled" and job.result["checkpointed"], (job.state, job.error)
    stopped_at = job.result["steps"]
    assert stopped_at < 24, "the job finished before the cancel arrived"
    show = cli_json("train", "show", run_id, "--json")["run"]
    assert show["state"] == "cancelled" and show["artifact"] is None

    # ... and `train lm --resume RUN` goes on from exactly that step.
    mark = _job_events(db, job_id)[-1][0]
    final = cli_json("train", "lm", "--resume", run_id, "--wait", "--json")["run"]
    steps_after = [d["step"] for _, k, d in _job_events(db, job_id, mark) if k == "progress" and "step" in d]
    assert steps_after[0] == stopped_at + 1 and steps_after[-1] == 24
    assert final["state"] == "succeeded"

    ours, reference = final["metrics"], straight["metrics"]
    assert ours["steps"] == reference["steps"] == 24
    assert [v for _, v in ours["train_losses"]] == pytest.approx([v for _, v in reference["train_losses"]],
                                                                   rel=RESUME_REL_TOLERANCE)
    assert [v for _, v in ours["val_losses"]] == pytest.approx([v for _, v in reference["val_losses"]],
                                                                 rel=RESUME_REL_TOLERANCE)
    assert ours["initial_val_loss"] == pytest.approx(reference["initial_val_loss"], rel=RESUME_REL_TOLERANCE)
    for key in ("loss", "token_accuracy", "rouge_l"):
        assert ours["test"][key] == pytest.approx(reference["test"][key], rel=RESUME_REL_TOLERANCE)

    actions = [r[0] for r in db.execute("SELECT action FROM audit_log WHERE object = ? ORDER BY seq", [run_id])]
    assert actions == ["train.create", "train.start", "train.interrupted", "train.resume", "train.cancel",
                       "train.resume", "train.finish"]
    # The TensorBoard curves travelled in the checkpoints: every step once across kill -9, SIGTERM and two
    # resumes, with the uninterrupted run's numbers.
    exported = run_cli("train", "export-curves", run_id, "--out", str(tmp_path / "tensorboard"))
    assert exported.returncode == 0, exported.stderr
    scalars = read_scalars(tmp_path / "tensorboard" / run_id)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 25))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in reference["train_losses"]],
                                                                   rel=RESUME_REL_TOLERANCE, abs=1e-6)
    assert [s for s, _ in scalars["val/loss"]] == [0, 4, 8, 12, 16, 20, 24]
    # The second run read the tokens the first one cached (encrypted) for the same data and tokenizer.
    messages = [r[0] for r in db.execute("SELECT message FROM job_events WHERE job_id = ? AND kind = 'log'",
                                         [job_id])]
    assert any("3 split(s) from the encrypted cache" in m for m in messages)


def _one_line_error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_operator_errors_are_one_line_with_a_hint_and_start_nothing(qa_dataset, tmp_path, unlock, passphrase_file):
    lm = ["train", "lm", "--base", "tiny-deepseek-r1"]
    assert "no dataset named 'nope'" in _one_line_error(run_cli(*lm, "--data", "nope"))
    text_to_classifier = _one_line_error(run_cli("train", "classifier", "--base", "tiny-resnet-cls", "--data", "qa"))
    assert "holds text records" in text_to_classifier and "airlock train lm" in text_to_classifier
    assert "not a language model" in _one_line_error(run_cli("train", "lm", "--base", "tiny-resnet-cls",
                                                             "--data", "qa"))
    bad = tmp_path / "bad.toml"
    bad.write_text("rnak = 8\n")
    assert f"{bad}: unknown field(s) rnak" in _one_line_error(run_cli(*lm, "--data", "qa", "--recipe", str(bad)))
    assert "needs --base and --data" in _one_line_error(run_cli("train", "lm", "--data", "qa"))
    assert "no training run 'nope'" in _one_line_error(run_cli("train", "lm", "--resume", "nope"))
    assert "no training run 'nope'" in _one_line_error(run_cli("train", "show", "nope"))
    assert "is not auto, cpu or cuda:N" in _one_line_error(run_cli(*lm, "--data", "qa", "--device", "gpu"))

    # An auditor reads metadata but never trains (and so never decrypts data); the refusal names the roles.
    carol = tmp_path / "carol.txt"
    carol.write_text("carol audits everything carefully\n")
    added = run_cli("users", "add", "carol", "--role", "auditor", "--passphrase-file", str(carol),
                    "--admin-passphrase-file", str(passphrase_file))
    assert added.returncode == 0, added.stderr
    assert run_cli("vault", "lock").returncode == 0
    unlock("--user", "carol", "--passphrase-file", str(carol))
    refused = _one_line_error(run_cli(*lm, "--data", "qa"))
    assert "training needs the admin or operator role" in refused

    assert run_cli("vault", "lock").returncode == 0
    locked = _one_line_error(run_cli(*lm, "--data", "qa"))
    assert "vault is locked" in locked and "airlock vault unlock" in locked
    assert [j["kind"] for j in cli_json("jobs", "list", "--json")["jobs"]] == ["data_import"]
    assert cli_json("train", "runs", "--json") == {"runs": []}
    assert "no training runs yet" in run_cli("train", "runs").stdout
