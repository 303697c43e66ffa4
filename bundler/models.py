"""Collect base models: config, tokenizer files and safetensors shards from a local HF directory.

Only data formats ship. Pickle-based weights (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`) can run code
when loaded, so they are refused with a hint to convert them to safetensors on the station.
"""

from __future__ import annotations

import re
from pathlib import Path

from bundler.errors import BundleError
from bundler.spec import ModelSpec

_SHIPPED = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|"
                      r"preprocessor_config|model\.safetensors\.index)\.json|chat_template\.jinja|tokenizer\.model|"
                      r"vocab\.(json|txt)|merges\.txt|.*\.safetensors")
_PICKLE = re.compile(r".*\.(bin|pt|pth|ckpt|pkl|pickle)")


def model_files(model: ModelSpec) -> list[Path]:
    """The files of one model that ship, sorted; refuses pickles and models without safetensors."""
    directory = fetch_model(model) if model.hub else model.path
    assert directory is not None
    if not (directory / "config.json").is_file():
        raise BundleError(f"{directory}: no config.json (model {model.name})",
                          hint="models.path must be a Hugging Face model directory")
    files = []
    for path in sorted(directory.iterdir()):
        if path.is_symlink() and not path.resolve().is_file():
            raise BundleError(f"{path}: dangling symlink in model {model.name}", hint="fetch the model again")
        if not path.is_file():
            continue
        if _PICKLE.fullmatch(path.name) and not path.name.endswith("training_args.bin"):
            raise BundleError(f"{path}: pickle weights can run code when loaded (model {model.name})",
                              hint="convert to safetensors on the build station (e.g. save_pretrained("
                                   "safe_serialization=True)) and remove the pickle file")
        if _SHIPPED.fullmatch(path.name):
            files.append(path)
    if not any(p.name.endswith(".safetensors") for p in files):
        raise BundleError(f"{directory}: no .safetensors weights (model {model.name})",
                          hint="bundles ship safetensors only; convert the weights on the build station")
    return files


def fetch_model(model: ModelSpec) -> Path:
    """Download a pinned hub revision on the build station (never on a target)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise BundleError(f"model {model.name}: hub download needs huggingface_hub on the build station",
                          hint="`pip install huggingface_hub`, or download the model and use models.path") from exc
    allow = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "vocab.txt", "merges.txt"]
    return Path(snapshot_download(repo_id=model.hub, revision=model.revision, allow_patterns=allow))
