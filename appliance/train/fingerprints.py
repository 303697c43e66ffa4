"""Content hashes that pin what a run was made from: the base model's files, its tokenizer, the recipe.

A name says which model was meant; the hash says which bytes were used. Hashing reads every file
of the model (a 7B model takes a while), so a training job does it once, when it starts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.audit import canonical_json

_CHUNK = 1024 * 1024
_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges", "added_tokens")


def tree_hash(root: Path, include: Callable[[str], bool] | None = None) -> str:
    """SHA-256 over (relative path, SHA-256 of contents) of every file under `root`, in path order.

    Hidden files (a hub cache, an editor's swap file) are not part of a model and are skipped.
    """
    digest = hashlib.sha256(b"airlock-tree/v1\0")
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or (include is not None and not include(rel)):
            continue
        digest.update(rel.encode("utf-8") + b"\0" + file_hash(path).encode("ascii"))
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def base_model_hash(model_dir: Path) -> str:
    """Every file of the base model: config, tokenizer and weights."""
    return tree_hash(model_dir)


def tokenizer_hash(model_dir: Path) -> str:
    """Only the files that decide token ids: a tokenized-data cache stays valid across weight updates."""
    return tree_hash(model_dir, lambda rel: "/" not in rel and rel.startswith(_TOKENIZER_PREFIXES))


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(b"airlock-recipe/v1\0" + canonical_json(recipe).encode("utf-8")).hexdigest()
