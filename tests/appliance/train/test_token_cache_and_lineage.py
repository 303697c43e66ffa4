"""The encrypted token cache (exact round trip, ciphertext, shredded with its dataset), the content hashes
that pin a run's lineage, and the run rows' strict-JSON metrics. Real vault, real tokenizer, no training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from appliance.base_models import resolve_base_model
from appliance.train.sft_data import Example
from tests.appliance.train.conftest import corpus_chats

PASSPHRASE = "token cache pass phrase"


@pytest.fixture
def vault(airlock_home: Path):
    """(db, keys, home) with the root key held in this process (the job uses the agent; same KeyOps)."""
    from appliance.catalog import open_catalog
    from appliance.vault.keys import LocalKeys
    from appliance.vault.keyslots import passphrase_kdf
    from appliance.vault.lifecycle import Credential, init_vault, open_root

    db = open_catalog()
    init_vault(db, PASSPHRASE, passphrase_kdf())
    _, root = open_root(db, Credential.passphrase(PASSPHRASE))
    return db, LocalKeys(root), airlock_home


def test_examples_round_trip_through_bytes_exactly():
    from appliance.train.token_cache import examples_from_bytes, examples_to_bytes

    examples = [Example((1, 2, 3), (-100, 2, 3), False), Example((7,), (-100,), True), Example((), (), False)]
    assert examples_from_bytes(examples_to_bytes(examples)) == examples
    assert examples_from_bytes(examples_to_bytes([])) == []


def test_cache_stores_ciphertext_and_a_second_reader_gets_identical_examples(vault):
    from transformers import AutoTokenizer

    from appliance.train.lm import encode_records
    from appliance.train.token_cache import VaultTokenCache, cache_object_id

    db, keys, home = vault
    base = resolve_base_model("tiny-deepseek-r1")
    tokenizer = AutoTokenizer.from_pretrained(base.path, local_files_only=True)
    records = [json.loads(line) for line in corpus_chats(12)]
    object_id = cache_object_id("ds-qa-1234", ["a" * 64], "b" * 64, 128)
    assert object_id.startswith("tok-ds-qa-1234-")
    assert object_id != cache_object_id("ds-qa-1234", ["a" * 64], "b" * 64, 256)  # max_length is part of the key

    first = VaultTokenCache(db, keys, home, object_id)
    encoded = first(tokenizer, records, 128, "train")
    assert first.misses == ["train"] and encoded == encode_records(tokenizer, records, 128, "train")
    raw = (home / "vault" / "objects" / object_id / "train.alv").read_bytes()
    assert not raw.startswith(b"PK") and b"lengths.npy" not in raw  # not a readable .npz on disk

    second = VaultTokenCache(db, keys, home, object_id)
    assert second(tokenizer, records, 128, "train") == encoded and second.hits == ["train"]


def test_caches_of_a_deleted_dataset_are_crypto_shredded(vault, tmp_path: Path):
    from appliance.data import datasets
    from appliance.data.pipeline import ImportOptions
    from appliance.data.store import delete_dataset, import_dataset
    from appliance.train.token_cache import VaultTokenCache, cache_object_id, shred_caches_of_deleted_datasets
    from appliance.vault import records

    db, keys, home = vault
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "qa.jsonl").write_text("\n".join(corpus_chats(30)) + "\n")
    import_dataset(db, home, keys, tmp_path / "in", "qa", ImportOptions(near_dup_threshold=None), job_id="job-1")
    ds = datasets.get(db, "qa")
    object_id = cache_object_id(ds.id, [datasets.versions(db, ds.id)[0].content_hash], "c" * 64, 64)
    VaultTokenCache(db, keys, home, object_id)(_WordTokens(), [{"text": "a b c"}], 64, "train")

    assert shred_caches_of_deleted_datasets(db, home) == []  # the dataset is alive: its cache stays
    delete_dataset(db, home, "qa")  # shreds what was derived from the dataset, caches included
    assert records.dek(db, object_id).state == "shredded"
    assert shred_caches_of_deleted_datasets(db, home) == []  # nothing left for the safety net
    assert not (home / "vault" / "objects" / object_id).exists()


class _WordTokens:
    """A stand-in tokenizer for one plain-text record (this test is about the vault object, not tokens)."""

    bos_token, eos_token = "", ""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [len(word) for word in text.split()]}


def test_tokenizer_hash_ignores_weights_and_base_hash_does_not(tmp_path: Path):
    from appliance.train.fingerprints import base_model_hash, recipe_hash, tokenizer_hash

    source = resolve_base_model("tiny-deepseek-r1").path
    copy = tmp_path / "model"
    shutil.copytree(source, copy)
    base, tokens = base_model_hash(copy), tokenizer_hash(copy)
    assert base == base_model_hash(source) and tokens == tokenizer_hash(source)  # content, not location

    (copy / "model.safetensors").write_bytes(b"other weights")
    changed = base_model_hash(copy)
    assert changed != base and tokenizer_hash(copy) == tokens
    (copy / ".cache").mkdir()
    (copy / ".cache" / "x").write_text("hub leftovers")  # hidden files are not part of the model
    assert base_model_hash(copy) == changed
    (copy / "tokenizer_config.json").write_text("{}")
    assert tokenizer_hash(copy) != tokens
    assert recipe_hash({"lr": 1e-3, "rank": 8}) == recipe_hash({"rank": 8, "lr": 1e-3})
    assert recipe_hash({"lr": 1e-3}) != recipe_hash({"lr": 2e-3})


def test_metrics_are_strict_json_and_curves_are_thinned():
    from appliance.train.jobs import MAX_CURVE_POINTS, _curve
    from appliance.train.runs import finite

    assert finite({"auc": float("nan"), "xs": [1.0, float("inf")], "n": 3}) == {"auc": None, "xs": [1.0, None],
                                                                                 "n": 3}
    points = [(i, float(i)) for i in range(1, 2001)]
    thinned = _curve(points)
    assert len(thinned) <= MAX_CURVE_POINTS + 1 and thinned[0] == [1, 1.0] and thinned[-1] == [2000, 2000.0]
    assert _curve([(4, 0.5)]) == [[4, 0.5]] and _curve([]) == []


def test_classifier_recipes_load_from_toml_with_the_same_checks(tmp_path: Path):
    from appliance.train.classifier import ClassifierRecipe
    from appliance.train.jobs import recipe_class, recipe_dict
    from appliance.train.recipe import RecipeError, load_recipe

    path = tmp_path / "cls.toml"
    path.write_text("max_steps = 40\nbatch_size = 8\naugment = false\n")
    recipe = load_recipe(path, recipe_class("classifier"))
    assert recipe == ClassifierRecipe(max_steps=40, batch_size=8, augment=False)
    assert recipe_dict(recipe)["augment"] is False and recipe_dict(load_recipe(None))["rank"] == 16
    path.write_text("rank = 8\n")  # a LoRA field: not a classifier's
    with pytest.raises(RecipeError, match=r"cls\.toml: unknown field\(s\) rank"):
        load_recipe(path, ClassifierRecipe)
    path.write_text("augment = 1\n")
    with pytest.raises(RecipeError, match="augment = 1 is not true or false"):
        load_recipe(path, ClassifierRecipe)
