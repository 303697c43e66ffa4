"""Deterministic train/val/test assignment from a seeded hash of a stable key.

The key is the record's content hash (text) or the patient pseudonym (DICOM, so that no patient
is in two splits). The same key, seed and ratios always give the same split: re-importing or
appending data never moves an old record, which incremental retraining depends on. The seed and
ratios are fixed per dataset when it is created and stored in the catalog.
"""

from __future__ import annotations

import hashlib
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


def assign_split(key: str, seed: str, spec: SplitSpec) -> str:
    """'train' | 'val' | 'test' for `key`, uniform over [0, 1) via SHA-256(seed, key)."""
    digest = hashlib.sha256(b"airlock-split/v1\0" + seed.encode() + b"\0" + key.encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    if point < spec.train:
        return "train"
    if point < spec.train + spec.val:
        return "val"
    return "test"
