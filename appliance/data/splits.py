"""Deterministic train/val/test assignment from a seeded hash of a stable key.

The key is the record's content hash (text, images) or the patient pseudonym (DICOM, so that no
patient is in two splits). The same key, seed and ratios always give the same split: re-importing
or appending data never moves an old record, which incremental retraining depends on. The seed and
ratios are fixed per dataset when it is created and stored in the catalog; the seed is derived
from the vault's site secret and the dataset's name (`dataset_split_seed`).

A hash alone can leave a split empty when a dataset has few groups (8 patients at 80/10/10 leave
validation empty about 40% of the time). `settle_splits` then moves the fewest new groups needed,
chosen by the same hash, so that every split with a non-zero fraction has a group whenever the
dataset has enough groups to give one. See docs/adr/0009-splits-that-cannot-starve.md.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSpec:
    """Fractions of records (or patients) per split; they must add up to 1."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        # `not (x >= 0)` and `not (... <= 1e-9)` also refuse NaN, which compares false both ways.
        if not (min(self.train, self.val, self.test) >= 0 and abs(self.train + self.val + self.test - 1.0) <= 1e-9):
            raise ValueError("split fractions must be >= 0 and add up to 1")

    @classmethod
    def parse(cls, text: str) -> SplitSpec:
        """'80/10/10' or '0.8,0.1,0.1'."""
        parts = [float(p) for p in text.replace("/", ",").split(",")]
        if len(parts) != 3:
            raise ValueError("give three numbers: train/val/test, e.g. 80/10/10")
        total = sum(parts)
        if not total > 0:
            raise ValueError("split fractions must add up to more than 0")
        return cls(*(p / total for p in parts))

    def to_text(self) -> str:
        return f"{self.train:.6g}/{self.val:.6g}/{self.test:.6g}"


def dataset_split_seed(site_secret: bytes, dataset_name: str) -> str:
    """A dataset's split seed: keyed by the vault's site secret, so nobody without the vault can
    predict which records are held out, and the same for the same name (a dataset deleted and
    imported again gets the same splits)."""
    return hmac.new(site_secret, b"airlock-split-seed/v1\0" + dataset_name.encode(), hashlib.sha256).hexdigest()[:32]


def split_point(key: str, seed: str) -> float:
    """Where `key` falls in [0, 1), uniformly, via SHA-256(seed, key)."""
    digest = hashlib.sha256(b"airlock-split/v1\0" + seed.encode() + b"\0" + key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _interval(spec: SplitSpec, split: str) -> tuple[float, float]:
    low = {"train": 0.0, "val": spec.train, "test": spec.train + spec.val}[split]
    return low, low + getattr(spec, split)


def assign_split(key: str, seed: str, spec: SplitSpec) -> str:
    """'train' | 'val' | 'test' for `key`."""
    point = split_point(key, seed)
    if point < spec.train:
        return "train"
    if point < spec.train + spec.val:
        return "val"
    return "test"


def settle_splits(new_groups: Iterable[str], seed: str, spec: SplitSpec,
                  old_groups: Mapping[str, str] | None = None) -> dict[str, str]:
    """The split of each new group, with no needed split left empty when the groups allow it.

    `new_groups` are this import's group keys (pseudonyms or content hashes); `old_groups` maps the
    dataset's stored groups to their splits: they never move, and a new record of an old group
    (another study of a known patient) joins its group's split. Every other group takes its hashed
    split; then, for each split with a non-zero fraction that has no group yet (train, then val,
    then test), the new group whose hash point lies nearest to that split's interval moves into
    it, taken only from a split that keeps at least one group. A dataset with fewer groups than
    needed splits keeps an empty split: training says so.
    """
    old_groups = old_groups or {}
    settled: dict[str, str] = {}
    points: dict[str, float] = {}
    for group in new_groups:
        if group in settled:
            continue
        if group in old_groups:
            settled[group] = old_groups[group]
            continue
        points[group] = split_point(group, seed)
        settled[group] = assign_split(group, seed, spec)
    counts = Counter(old_groups.values())
    counts.update(settled[g] for g in settled if g not in old_groups)
    for split in SPLITS:
        if getattr(spec, split) <= 0 or counts[split] > 0:
            continue
        low, high = _interval(spec, split)
        movable = [g for g in points if counts[settled[g]] > 1]
        if not movable:
            continue
        group = min(movable, key=lambda g: (max(low - points[g], points[g] - high, 0.0), g))
        counts[settled[group]] -= 1
        settled[group] = split
        counts[split] += 1
    return settled
