"""Tokenized training data, cached encrypted in the vault and reused by resumes and retrains.

Token ids decode back to the records, so the cache is customer data: one vault object (own DEK,
kind `token-cache`) per (dataset, the versions read, tokenizer files, max_length, encoder
version), one file per split. Its id names the dataset (`tok-<dataset id>-<key>`) so that the
caches of a deleted dataset can be found and crypto-shredded (`shred_caches_of_deleted_datasets`).
The arrays are stored as `.npz` and loaded with `allow_pickle=False`: no code in a cache file runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.train.lm import encode_records
from appliance.train.sft_data import Example

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.vault.keys import KeyOps

KIND = "token-cache"
# Bump when encode_record's output for the same input changes: old caches are then simply not found.
ENCODER_VERSION = "sft-encode/v2"  # v2: the last reply keeps its reasoning; truncation keeps the answer


def cache_object_id(dataset_id: str, version_hashes: Sequence[str], tokenizer_hash: str, max_length: int) -> str:
    digest = hashlib.sha256(f"{ENCODER_VERSION}\0{dataset_id}\0{','.join(version_hashes)}\0{tokenizer_hash}\0"
                            f"{max_length}".encode())
    return f"tok-{dataset_id}-{digest.hexdigest()[:24]}"


def examples_to_bytes(examples: Sequence[Example]) -> bytes:
    import numpy as np

    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    ids = np.array([t for e in examples for t in e.input_ids], dtype=np.int64)
    labels = np.array([t for e in examples for t in e.labels], dtype=np.int64)
    truncated = np.array([e.truncated for e in examples], dtype=np.bool_)
    buffer = io.BytesIO()
    np.savez(buffer, lengths=lengths, ids=ids, labels=labels, truncated=truncated)
    return buffer.getvalue()


def examples_from_bytes(data: bytes) -> list[Example]:
    import numpy as np

    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        lengths, ids, labels = arrays["lengths"].tolist(), arrays["ids"].tolist(), arrays["labels"].tolist()
        truncated = arrays["truncated"].tolist()
    out, start = [], 0
    for length, cut in zip(lengths, truncated, strict=True):
        out.append(Example(tuple(ids[start:start + length]), tuple(labels[start:start + length]), bool(cut)))
        start += length
    return out


class VaultTokenCache:
    """An `lm.Encoder` that reads each split's examples from the vault, or encodes and stores them.

    `hits` and `misses` name the splits, for the job's log. `store_misses=False` (the ranks other
    than 0 of a torchrun job) reads the cache but leaves writing it to rank 0.
    """

    def __init__(self, db: sqlite_utils.Database, keys: KeyOps, home: Path, object_id: str, *,
                 store_misses: bool = True) -> None:
        self.db, self.keys, self.home, self.object_id = db, keys, home, object_id
        self.store_misses = store_misses
        self.hits: list[str] = []
        self.misses: list[str] = []

    def __call__(self, tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int,
                 split: str) -> list[Example]:
        from appliance.vault import store

        if split in store.list_files(self.home, self.object_id):
            examples = examples_from_bytes(store.read_bytes(self.db, self.keys, self.home, self.object_id, split))
            if len(examples) == len(records):
                self.hits.append(split)
                return examples
        examples = encode_records(tokenizer, records, max_length, split)
        self.misses.append(split)
        if not self.store_misses:
            return examples
        self._ensure_object()
        store.write_bytes(self.db, self.keys, self.home, self.object_id, split, examples_to_bytes(examples),
                          overwrite=True)
        return examples

    def _ensure_object(self) -> None:
        from appliance.vault import records, store
        from appliance.vault.errors import ObjectError

        try:
            records.dek(self.db, self.object_id)
        except ObjectError:
            with contextlib.suppress(ObjectError):  # another job created it a moment ago: use theirs
                store.create_object(self.db, self.keys, self.object_id, KIND)


def shred_caches_of_deleted_datasets(db: sqlite_utils.Database, home: Path) -> list[str]:
    """Crypto-shred the token caches of datasets that no longer exist. Needs no key. Returns the object ids."""
    from appliance.vault.store import delete_object

    rows = db.execute("SELECT object_id FROM vault_deks WHERE kind = ? AND state = 'active'", [KIND]).fetchall()
    live = {r[0] for r in db.execute("SELECT id FROM datasets WHERE state != 'deleted'")}
    shredded = []
    for (object_id,) in rows:
        dataset_id = object_id.removeprefix("tok-").rsplit("-", 1)[0]
        if dataset_id not in live:
            delete_object(db, home, object_id)
            shredded.append(object_id)
    return shredded

