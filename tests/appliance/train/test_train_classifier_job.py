"""`airlock train classifier` on PNGs imported through `airlock data import`: a job that finds the vault
locked fails with the vault's hint and resumes once unlocked; the stored classifier reloads exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.catalog import open_catalog
from tests.appliance.train.conftest import cli_json, read_scalars
from tests.conftest import run_cli

SIZE = 32


def write_shapes(root: Path, count: int) -> None:
    """Noisy discs and squares as 8-bit grey PNGs, one folder per class (the folder name is the label)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(count):
        label = "disc" if i % 2 == 0 else "square"
        cy, cx = rng.integers(10, SIZE - 10, 2)
        if label == "disc":
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
        else:
            shape = (abs(yy - cy) <= 5) & (abs(xx - cx) <= 5)
        pixels = np.clip(shape * 0.7 + rng.random((SIZE, SIZE)) * 0.3, 0, 1)
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255).astype(np.uint8), "L").save(root / label / f"scan{i:03d}.png")


def test_classifier_job_fails_locked_resumes_unlocked_and_reloads_exactly(unlocked, unlock, tmp_path, airlock_home):
    from appliance.jobs.runner import wait_for
    from appliance.train.artifacts import load_classifier_weights
    from appliance.train.classifier import ClassifierRecipe, classification_metrics, predict
    from appliance.train.inputs import check_pinned, image_splits
    from appliance.train.jobs import start_training
    from appliance.train.runs import get_run
    from appliance.vault.lifecycle import keys_for

    write_shapes(tmp_path / "shapes", 120)
    imported = run_cli("data", "import", str(tmp_path / "shapes"), "--name", "shapes", "--image-size", str(SIZE),
                       "--split", "60/20/20")
    assert imported.returncode == 0, imported.stderr

    # Started while the vault is locked (as a scheduler could): the job fails with the vault's own message.
    assert run_cli("vault", "lock").returncode == 0
    db = open_catalog()
    recipe = ClassifierRecipe(max_steps=40, eval_every=10, batch_size=16, lr=3e-3)
    run, job = start_training(db, "classifier", "tiny-resnet-cls", "shapes", recipe, device="cpu")
    failed = wait_for(db, job.id, timeout_s=120)
    assert failed.state == "failed" and "vault is locked" in failed.error and "airlock vault unlock" in failed.hint
    assert get_run(db, run.id).state == "failed"

    unlock()
    out = cli_json("train", "classifier", "--resume", run.id, "--wait", "--json")
    done = out["run"]
    assert done["state"] == "succeeded", out["job"]["error"]
    metrics = done["metrics"]
    print(f"\nbest val AUC {metrics['best_val_auc']}, test {metrics['test']['roc_auc']}")
    assert metrics["labels"] == ["disc", "square"] and metrics["steps"] == 40
    assert metrics["best_val_auc"] > 0.8  # measured 1.0 with the fixed site secret (test AUC 0.978)
    test = test_metrics = metrics["test"]
    assert sum(map(sum, test["confusion"])) == metrics["records"]["test"] > 0
    # Its curves, exported as a TensorBoard event file: every step once, the validation AUC at each evaluation.
    exported = run_cli("train", "export-curves", run.id, "--out", str(tmp_path / "tensorboard"))
    assert exported.returncode == 0, exported.stderr
    scalars = read_scalars(tmp_path / "tensorboard" / run.id)
    assert set(scalars) == {"train/loss", "train/lr", "train/grad_norm", "val/auc", "test/accuracy", "test/auc"}
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in scalars["train/grad_norm"]] == list(range(1, 41))
    assert [s for s, _ in scalars["val/auc"]] == [10, 20, 30, 40]
    assert scalars["test/accuracy"] == [(40, pytest.approx(test_metrics["accuracy"], rel=1e-6))]
    wrong_kind = run_cli("train", "lm", "--resume", run.id)
    assert wrong_kind.returncode == 2 and "was started with `airlock train classifier`" in wrong_kind.stderr
    again = run_cli("train", "classifier", "--resume", run.id)
    assert again.returncode == 2 and "already finished" in again.stderr and "hint: " in again.stderr

    # The stored weights are ciphertext and reload into the same predictions.
    stored = airlock_home / "vault" / "objects" / done["artifact"] / "classifier.safetensors.alv"
    assert b"__metadata__" not in stored.read_bytes() and b"classifier.1" not in stored.read_bytes()
    keys = keys_for(db, airlock_home)
    model, labels = load_classifier_weights(db, keys, airlock_home, get_run(db, run.id))
    assert labels == ["disc", "square"]
    pinned = check_pinned(db, done["dataset_id"], "shapes", done["dataset_version"], done["dataset_hash"])
    images, targets = image_splits(db, keys, airlock_home, pinned).splits["test"]
    reloaded = classification_metrics(predict(model, images), targets, labels)
    assert reloaded.accuracy == pytest.approx(test["accuracy"]) and reloaded.confusion == test["confusion"]
