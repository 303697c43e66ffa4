"""Splits that cannot starve: every needed split gets a group whenever the dataset has enough groups,
old records never move, a patient stays in one split, and a small DICOM set trains whatever the key.

The 8-patient case is the one that made the demo crash: with 80/10/10, a hash alone leaves the
validation split empty for about 0.9^8 = 43% of site secrets.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from appliance.data.pipeline import ImportOptions, KnownRecords, run_import
from appliance.data.splits import SPLITS, SplitSpec, assign_split, dataset_split_seed, settle_splits
from tests.appliance.train.conftest import cli_json
from tests.conftest import fix_site_secret, run_cli

SPEC = SplitSpec()  # 80/10/10
KEYS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]


def test_no_group_moves_when_the_hash_fills_every_split():
    settled = settle_splits(KEYS, "seed", SPEC)
    assert settled == {k: assign_split(k, "seed", SPEC) for k in KEYS}


@pytest.mark.parametrize("groups", [3, 4, 5, 8, 12])
def test_every_needed_split_gets_a_group_with_the_fewest_moves(groups):
    starved = 0
    for seed in (f"seed-{n}" for n in range(300)):
        keys = KEYS[:groups]
        hashed = {k: assign_split(k, seed, SPEC) for k in keys}
        settled = settle_splits(keys, seed, SPEC)
        assert set(settled.values()) == set(SPLITS), (groups, seed, settled)
        missing = len(set(SPLITS) - set(hashed.values()))
        starved += bool(missing)
        assert sum(hashed[k] != settled[k] for k in keys) == missing  # one moved group per empty split
        assert settled == settle_splits(list(reversed(keys)), seed, SPEC)  # order of arrival does not matter
    assert starved > 0  # the seeds did exercise the starved case (e.g. 8 groups: ~43% of seeds)


def test_too_few_groups_leave_a_split_empty_and_a_zero_fraction_stays_empty():
    two = settle_splits(KEYS[:2], "seed", SPEC)
    assert len(set(two.values())) == 2 and "train" in two.values()
    assert set(settle_splits(KEYS[:1], "seed", SPEC).values()) == {"train"}
    no_val = SplitSpec(0.8, 0.0, 0.2)
    assert set(settle_splits(KEYS[:3], "seed", no_val).values()) == {"train", "test"}
    assert settle_splits([], "seed", SPEC) == {}


def test_old_groups_never_move_and_new_records_of_an_old_group_join_its_split():
    # An earlier import left val and test empty (2 patients, both hashed to train).
    old = {"patient-a": "train", "patient-b": "train"}
    new = ["patient-a", *KEYS[:3]]
    settled = settle_splits(new, "seed", SPEC, old)
    assert settled["patient-a"] == "train"
    assert "patient-b" not in settled
    assert {"val", "test"} <= {settled[k] for k in KEYS[:3]}  # the append fills the empty splits
    # An old group moved by an earlier settling keeps its stored split, not its hashed one.
    moved = next(k for k in KEYS if assign_split(k, "seed", SPEC) == "train")
    again = settle_splits([moved], "seed", SPEC, {moved: "val", "other": "train", "third": "test"})
    assert again == {moved: "val"}


def test_the_split_seed_is_keyed_by_the_site_secret_and_the_dataset_name():
    seed = dataset_split_seed(b"k" * 32, "ct")
    assert seed == dataset_split_seed(b"k" * 32, "ct") and len(seed) == 32
    assert seed != dataset_split_seed(b"j" * 32, "ct") and seed != dataset_split_seed(b"k" * 32, "mri")


# --- through the importer and the trainer ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eight_patients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 patients, one phantom CT slice each (patients alternate normal/abnormal), 32 x 32."""
    from appliance.demo.dicom_phantoms import write_phantom_set

    root = tmp_path_factory.mktemp("eight") / "dicom"
    write_phantom_set(root, patients=8, images=1, size=32)
    return root


def _splits_of(root: Path, secret: bytes) -> tuple[dict, dict[str, set[str]]]:
    """The import's records (settled splits applied, as the store does) as tensors, and patients per split."""
    import numpy as np
    import torch

    from appliance.data.images import decode_image_payload

    records = []
    options = ImportOptions(fmt="dicom", image_size=32)
    report = run_import(root, options, secret=secret, split_seed=dataset_split_seed(secret, "ct"),
                        known=KnownRecords(), sink=records.append)
    patients: dict[str, set[str]] = {s: set() for s in SPLITS}
    pixels: dict[str, list] = {s: [] for s in SPLITS}
    targets: dict[str, list[int]] = {s: [] for s in SPLITS}
    for record in records:
        split = report.group_splits[record.group_key]
        patients[split].add(record.group_key)
        pixels[split].append(np.asarray(decode_image_payload(record.payload)[0], dtype=np.float16))
        targets[split].append(["normal", "abnormal"].index(record.label))
    assert report.splits == {s: len(pixels[s]) for s in SPLITS if pixels[s]}
    tensors = {s: (torch.from_numpy(np.stack(pixels[s])), torch.tensor(targets[s])) for s in SPLITS}
    return tensors, patients


def test_eight_patients_train_a_classifier_under_twenty_site_secrets(eight_patients: Path):
    from appliance.base_models import resolve_base_model
    from appliance.train.classifier import ClassifierRecipe, train_classifier, unmeasured_splits

    base = resolve_base_model("tiny-resnet-cls")
    recipe = ClassifierRecipe(max_steps=2, eval_every=1, batch_size=4)
    sizes = Counter()
    for n in range(20):
        secret = hashlib.sha256(f"site-{n}".encode()).digest()
        splits, patients = _splits_of(eight_patients, secret)
        assert all(patients[s] for s in SPLITS), (n, {s: len(p) for s, p in patients.items()})
        assert sum(len(p) for p in patients.values()) == 8  # a patient is in one split only
        sizes.update({s: len(p) for s, p in patients.items()})
        # One image per patient: a split of one patient is one class, and says so.
        lines = unmeasured_splits(splits, 2)
        one_class = [s for s in ("val", "test") if len(set(splits[s][1].tolist())) == 1]
        assert [line.split(" images")[0].removeprefix("the ") for line in lines] == one_class
        result = train_classifier(base, splits["train"], splits["val"], recipe, labels=["normal", "abnormal"],
                                  test=splits["test"])
        assert result.steps == 2 and result.test is not None
        measured = result.test.to_dict()
        assert measured["accuracy"] is not None
        assert (measured["roc_auc"] is None) == ("test" in one_class)
        assert (result.best_val_auc is None) == ("val" in one_class)
    assert sizes["train"] > sizes["val"] and sizes["train"] > sizes["test"]


def test_a_one_class_or_empty_validation_split_is_not_measured_and_does_not_stop_early():
    import torch

    from appliance.base_models import resolve_base_model
    from appliance.train.classifier import ClassifierRecipe, train_classifier, unmeasured_splits

    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 32, 32, generator=g).half()
    train = (images, torch.tensor([0, 1] * 4))
    one_class = (images[:3], torch.tensor([1, 1, 1]))
    empty = (images[:0], torch.tensor([], dtype=torch.int64))
    lines = unmeasured_splits({"train": train, "val": one_class, "test": empty}, 2)
    assert lines == [
        "the val images are all of one class: val AUC not measured, no early stopping; hint: import studies of "
        "more patients (each patient's images stay in one split)",
        "no test images in this dataset: test metrics not measured; hint: import studies of more patients "
        "(each patient's images stay in one split)"]
    recipe = ClassifierRecipe(max_steps=4, eval_every=1, batch_size=4, early_stopping_patience=1)
    base = resolve_base_model("tiny-resnet-cls")
    for val in (one_class, empty):
        result = train_classifier(base, train, val, recipe, labels=["normal", "abnormal"], test=one_class)
        assert result.steps == 4 and not result.stopped_early
        assert result.best_val_auc is None and result.val_aucs == []
        metrics = result.test.to_dict()
        assert metrics["roc_auc"] is None and metrics["accuracy"] is not None
        assert metrics["sensitivity"]["normal"] is None  # no normal image to be sensitive to


def test_eight_patients_through_the_vault_and_a_training_job(vault_init, unlock, eight_patients: Path):
    """The operator's path: CLI import into a real vault (random site secret), then a classifier job."""
    vault_init()
    unlock()
    imported = run_cli("data", "import", str(eight_patients), "--name", "ct", "--format", "dicom",
                       "--image-size", "32")
    assert imported.returncode == 0, imported.stderr
    counts = cli_json("data", "show", "ct", "--json")["split_counts"]
    assert all(counts.get(s, 0) > 0 for s in SPLITS), counts
    recipe = eight_patients.parent / "cls.toml"
    recipe.write_text("max_steps = 2\neval_every = 1\nbatch_size = 4\n")
    out = cli_json("train", "classifier", "--base", "tiny-resnet-cls", "--data", "ct", "--recipe", str(recipe),
                   "--wait", "--json")
    assert out["run"]["state"] == "succeeded", out["job"]["error"]
    assert out["run"]["metrics"]["records"] == counts


def test_a_fixed_site_secret_gives_the_same_splits_in_two_vaults(fast_kdf, eight_patients: Path, tmp_path: Path):
    """What the deterministic tests rely on: same site secret, same data -> same pseudonyms and splits."""
    from appliance.catalog import open_catalog
    from appliance.data import datasets
    from appliance.data.store import import_dataset
    from appliance.vault.keys import LocalKeys
    from appliance.vault.keyslots import passphrase_kdf
    from appliance.vault.lifecycle import Credential, init_vault, open_root

    seen = []
    for n in range(2):
        home = tmp_path / f"home{n}"
        home.mkdir()
        db = open_catalog(home)
        init_vault(db, "a passphrase for this test", passphrase_kdf())
        keys = LocalKeys(open_root(db, Credential.passphrase("a passphrase for this test"))[1])
        fix_site_secret(home, keys=keys)
        import_dataset(db, home, keys, eight_patients, "ct", ImportOptions(fmt="dicom", image_size=32),
                       job_id=f"job-{n}", actor="test")
        seen.append(sorted((r.group_key, r.split) for r in datasets.records(db, datasets.get(db, "ct").id)))
        db.close()
    assert seen[0] == seen[1] and {split for _, split in seen[0]} == set(SPLITS)
