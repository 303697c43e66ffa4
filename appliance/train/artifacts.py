"""Trained weights in the vault, written from memory and read back into memory.

    vault object run-<run id> (kind model)
        adapter.safetensors      LoRA weights (peft state-dict names), language-model runs
        eval_samples.json        test-split generations: they quote the site's data
        classifier.safetensors   full weights, classifier runs
        labels.json              class names in output order, classifier runs

Weights trained on customer data can reproduce it, so they are customer data: encrypted like a
dataset, with their own data key (deleting the object crypto-shreds them). The LoRA structure is
rebuilt from the run's recipe and base model (`build_lora_model`), so the recipe in the run row is
what makes an adapter loadable; the base model's hash is checked before loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import AirlockError
from appliance.train.runs import Run

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.vault.keys import KeyOps

ADAPTER = "adapter.safetensors"
EVAL_SAMPLES = "eval_samples.json"
CLASSIFIER = "classifier.safetensors"
LABELS = "labels.json"
FORMAT = "airlock-artifact/v1"


def artifact_object_id(run_id: str) -> str:
    return f"run-{run_id}"


def tensors_to_bytes(state: dict[str, Any], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata={"format": FORMAT, **metadata})


def save_artifact(db: sqlite_utils.Database, keys: KeyOps, home: Path, run_id: str, files: dict[str, bytes]) -> str:
    """Encrypt `files` into the run's model object (created on first use). Returns the object id."""
    from appliance.vault import records, store
    from appliance.vault.errors import ObjectError

    object_id = artifact_object_id(run_id)
    try:
        records.dek(db, object_id)  # a job that died after creating it: write again, same object
    except ObjectError:
        store.create_object(db, keys, object_id, "model")
    for name, data in files.items():
        store.write_bytes(db, keys, home, object_id, name, data, overwrite=True)
    return object_id


def _artifact_of(run: Run) -> str:
    if run.state != "succeeded" or not run.artifact:
        raise AirlockError(f"run {run.id} is {run.state} and has no trained weights",
                           hint="only succeeded runs have an artifact; see `airlock train show " + run.id + "`")
    return run.artifact


def _base_for(run: Run, verify_base: bool) -> Any:
    from appliance.base_models import resolve_base_model
    from appliance.train.fingerprints import base_model_hash

    base = resolve_base_model(run.base_model)
    if verify_base and base_model_hash(base.path) != run.base_hash:
        raise AirlockError(f"base model {run.base_model} at {base.path} is not the one run {run.id} was trained on",
                           hint="install the exact base model the run names (its hash is in `airlock train show`)")
    return base


def load_lm_adapter(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run, *,
                    verify_base: bool = True) -> tuple[Any, Any]:
    """(peft model in eval mode, tokenizer) with the run's adapter, decrypted in memory."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load

    from appliance.train.lm import build_lora_model
    from appliance.train.recipe import recipe_from_dict
    from appliance.vault.store import read_bytes

    object_id = _artifact_of(run)
    base = _base_for(run, verify_base)
    model, tokenizer = build_lora_model(base, recipe_from_dict(run.recipe, f"run {run.id} recipe"))
    state = load(read_bytes(db, keys, home, object_id, ADAPTER))
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise AirlockError(f"the adapter of run {run.id} does not fit its base model {run.base_model}",
                           hint="the run's recipe or base model changed; retrain")
    model.eval()
    return model, tokenizer


def load_eval_samples(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run) -> list[dict[str, str]]:
    from appliance.vault.store import list_files, read_bytes

    object_id = _artifact_of(run)
    if EVAL_SAMPLES not in list_files(home, object_id):
        return []
    return json.loads(read_bytes(db, keys, home, object_id, EVAL_SAMPLES))


def load_classifier_weights(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run, *,
                            verify_base: bool = True) -> tuple[Any, list[str]]:
    """(classifier in eval mode, class names in output order)."""
    from safetensors.torch import load

    from appliance.train.classifier import load_classifier
    from appliance.vault.store import read_bytes

    object_id = _artifact_of(run)
    base = _base_for(run, verify_base)
    labels = json.loads(read_bytes(db, keys, home, object_id, LABELS))["labels"]
    model = load_classifier(base, len(labels), 0)
    model.load_state_dict(load(read_bytes(db, keys, home, object_id, CLASSIFIER)))
    model.eval()
    return model, labels
