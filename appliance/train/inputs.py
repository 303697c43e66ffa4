"""Training inputs from the encrypted dataset store, decrypted into memory only.

A run is pinned to one dataset version when it is created: it reads the records of every version
up to that one, in storage order, so a resume or a retrain sees exactly the same data even after
newer imports. Text datasets give chat/text records for `train_lora`; image and DICOM datasets
give float16 tensors and class indices for `train_classifier`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.data import datasets
from appliance.data.datasets import Dataset
from appliance.data.errors import DataError

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.vault.keys import KeyOps

SPLITS = ("train", "val", "test")
KIND_FOR_TASK = {"lm": ("text",), "classifier": ("images", "dicom")}


@dataclass(frozen=True)
class PinnedDataset:
    dataset: Dataset
    version: int
    content_hash: str
    """The pinned version's content hash (what the run row cites)."""
    version_hashes: tuple[str, ...]
    """Content hashes of versions 1..version: together they are the data the run reads."""

    def split_counts(self, db: sqlite_utils.Database) -> dict[str, int]:
        counts = dict.fromkeys(SPLITS, 0)
        for row in datasets.records(db, self.dataset.id, max_version=self.version):
            counts[row.split] += 1
        return counts


def pin_dataset(db: sqlite_utils.Database, name: str, task: str) -> PinnedDataset:
    """The latest version of dataset `name`, checked to suit `task` (lm or classifier) and to have training data."""
    ds = datasets.get(db, name)
    if ds.kind not in KIND_FOR_TASK[task]:
        if task == "classifier":
            raise DataError(f"dataset {name!r} holds {ds.kind} records; `airlock train classifier` needs images or "
                            "DICOM", hint="train a language model on it with `airlock train lm`, or import images "
                                          "with `airlock data import DIR --name NAME --format images`")
        raise DataError(f"dataset {name!r} holds {ds.kind}; `airlock train lm` needs text records",
                        hint="train an image classifier on it with `airlock train classifier`")
    versions = datasets.versions(db, ds.id)
    if not versions:
        raise DataError(f"dataset {name!r} has no imported version yet", hint="import data with `airlock data import`")
    pinned = PinnedDataset(ds, versions[-1].version, versions[-1].content_hash,
                           tuple(v.content_hash for v in versions))
    if pinned.split_counts(db)["train"] == 0:
        raise DataError(f"dataset {name!r} has no records in its train split",
                        hint="import more records; small imports may land entirely in val/test")
    return pinned


def check_pinned(db: sqlite_utils.Database, dataset_id: str, name: str, version: int, content_hash: str
                 ) -> PinnedDataset:
    """At job (re)start: the pinned dataset version still exists with the same content."""
    ds = datasets.find(db, name)
    if ds is None or ds.id != dataset_id:
        raise DataError(f"dataset {name!r} ({dataset_id}) that this run trains on was deleted",
                        hint="its data is gone; start a new run on a dataset that exists (`airlock data list`)")
    versions = [v for v in datasets.versions(db, ds.id) if v.version <= version]
    if not versions or versions[-1].version != version or versions[-1].content_hash != content_hash:
        raise DataError(f"dataset {name!r} version {version} is not the one this run was started on",
                        hint="the catalog changed under the run; check `airlock audit verify`, then start a new run")
    return PinnedDataset(ds, version, content_hash, tuple(v.content_hash for v in versions))


def text_splits(db: sqlite_utils.Database, keys: KeyOps, home: Path, pinned: PinnedDataset
                ) -> dict[str, list[dict[str, Any]]]:
    """Chat or text records per split, as `train_lora` reads them (one pass over the shards)."""
    from appliance.data.store import iter_records

    out: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for record in iter_records(db, keys, home, pinned.dataset, max_version=pinned.version):
        value = record.json()
        value.pop("source_format", None)  # provenance, not training input
        out[record.split].append(value)
    return out


@dataclass
class ImageSplits:
    splits: dict[str, tuple[Any, Any]]
    """split -> (float16 N x C x H x W in [0, 1], int64 class indices)"""
    labels: list[str]
    skipped: int
    """Records left out: no label, or a label the train split never shows."""


def decode_pixels(payload: bytes) -> Any:
    """The stored image as a float16 C x H x W numpy array in [0, 1]."""
    import numpy as np

    try:
        from appliance.data.images import decode_image_payload
    except ImportError:  # older stores: the payload is an .npz with `pixels`
        with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
            return arrays["pixels"]
    return np.asarray(decode_image_payload(payload)[0])


def image_splits(db: sqlite_utils.Database, keys: KeyOps, home: Path, pinned: PinnedDataset) -> ImageSplits:
    """Images and labels per split. Classes are the labels seen in the train split, sorted by name."""
    import numpy as np
    import torch

    from appliance.data.store import iter_records

    train_labels = {row.label for row in datasets.records(db, pinned.dataset.id, split="train",
                                                          max_version=pinned.version) if row.label}
    labels = sorted(train_labels)
    name = pinned.dataset.name
    if len(labels) < 2:
        raise DataError(f"dataset {name!r} has {len(labels)} labelled class(es) in its train split; a classifier "
                        "needs at least two",
                        hint="import with `--labels labels.csv` (key,label) so that images have classes")
    index = {label: i for i, label in enumerate(labels)}
    pixels: dict[str, list[Any]] = {split: [] for split in SPLITS}
    targets: dict[str, list[int]] = {split: [] for split in SPLITS}
    skipped = 0
    for record in iter_records(db, keys, home, pinned.dataset, max_version=pinned.version):
        if record.label not in index:
            skipped += 1
            continue
        pixels[record.split].append(np.asarray(decode_pixels(record.payload), dtype=np.float16))
        targets[record.split].append(index[record.label])
    shapes = {a.shape[1:] for arrays in pixels.values() for a in arrays}
    if len(shapes) > 1:
        sizes = ", ".join(sorted("x".join(map(str, s)) for s in shapes))
        raise DataError(f"dataset {name!r} mixes image sizes ({sizes})",
                        hint="re-import it with one --image-size so every image has the same size")
    channels = max((a.shape[0] for arrays in pixels.values() for a in arrays), default=1)
    splits = {}
    for split in SPLITS:
        arrays = [np.repeat(a, channels, axis=0) if a.shape[0] == 1 and channels > 1 else a for a in pixels[split]]
        if arrays:
            images = torch.from_numpy(np.stack(arrays))
        else:
            height, width = next(iter(shapes)) if shapes else (1, 1)
            images = torch.zeros((0, channels, height, width), dtype=torch.float16)
        splits[split] = (images, torch.tensor(targets[split], dtype=torch.int64))
    return ImageSplits(splits, labels, skipped)
