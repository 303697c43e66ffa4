"""Duplicate detection: exact (SHA-256 of the normalized record) and near (MinHash + LSH).

MinHash scheme `mh64-b7-v1`: the record's text, case-folded with whitespace collapsed, as UTF-8;
shingles are the 7-byte windows; each shingle is mixed with splitmix64 and hashed 64 times with
multiply-shift hashing (fixed odd multipliers from a fixed seed); the signature is the 64 minima,
as uint32. LSH uses 16 bands of 4 rows: candidates share a band; a candidate is a duplicate when
the estimated Jaccard similarity (fraction of equal signature slots) reaches the threshold.
Signatures are stored in the catalog, so the scheme must never change under the same name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

SCHEME = "mh64-b7-v1"
NUM_PERM = 64
BANDS = 16
ROWS = NUM_PERM // BANDS
SHINGLE = 7
_CHUNK = 1 << 15
_PARAMS: tuple[np.ndarray, np.ndarray] | None = None


def record_hash(messages: tuple[tuple[str, str], ...]) -> str:
    """SHA-256 hex of the cleaned record in canonical JSON: the record's identity everywhere."""
    body = json.dumps([list(m) for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def minhash_text(messages: tuple[tuple[str, str], ...]) -> str:
    """What near-duplicate detection compares: contents only, case-folded, whitespace collapsed."""
    return " ".join(" ".join(content.casefold().split()) for _, content in messages)


def _params() -> tuple[np.ndarray, np.ndarray]:
    global _PARAMS
    if _PARAMS is None:
        import numpy as np

        rng = np.random.default_rng(0x41524C4B)  # "ARLK": fixed forever for scheme mh64-b7-v1
        a = rng.integers(1, 2**63, size=NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        b = rng.integers(0, 2**63, size=NUM_PERM, dtype=np.uint64)
        _PARAMS = (a, b)
    return _PARAMS


def _splitmix64(x: np.ndarray) -> np.ndarray:
    import numpy as np

    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def signature(text: str) -> np.ndarray:
    """The 64-slot uint32 MinHash signature of `text`."""
    import numpy as np

    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint64)
    if len(data) < SHINGLE:
        data = np.concatenate([data, np.zeros(SHINGLE - len(data), dtype=np.uint64)])
    n = len(data) - SHINGLE + 1
    shingles = np.zeros(n, dtype=np.uint64)
    for i in range(SHINGLE):
        shingles = (shingles << np.uint64(8)) | data[i:i + n]
    shingles = _splitmix64(np.unique(shingles))
    a, b = _params()
    best = np.full(NUM_PERM, np.iinfo(np.uint64).max, dtype=np.uint64)
    with np.errstate(over="ignore"):
        # Chunked so that a 16 MiB record costs 64 x 32 Ki words at a time, not 64 x 16 Mi.
        for start in range(0, len(shingles), _CHUNK):
            chunk = shingles[start:start + _CHUNK]
            hashed = (chunk[None, :] * a[:, None] + b[:, None]) >> np.uint64(32)
            np.minimum(best, hashed.min(axis=1), out=best)
    return best.astype(np.uint32)


@dataclass
class NearDupIndex:
    """LSH over MinHash signatures. `query` returns the key of a near duplicate, or None."""

    threshold: float = 0.85
    _bands: dict[bytes, list[int]] = field(default_factory=dict)
    _sigs: list[np.ndarray] = field(default_factory=list)
    _keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("the near-duplicate threshold must be in (0, 1]")

    def __len__(self) -> int:
        return len(self._keys)

    def query(self, sig: np.ndarray) -> str | None:
        import numpy as np

        seen: set[int] = set()
        for key in _band_keys(sig):
            for idx in self._bands.get(key, ()):
                if idx in seen:
                    continue
                seen.add(idx)
                if float(np.mean(self._sigs[idx] == sig)) >= self.threshold:
                    return self._keys[idx]
        return None

    def add(self, key: str, sig: np.ndarray) -> None:
        idx = len(self._keys)
        self._keys.append(key)
        self._sigs.append(sig)
        for band in _band_keys(sig):
            self._bands.setdefault(band, []).append(idx)

    def merge(self, other: NearDupIndex) -> None:
        """Add every signature of `other` (a finished file's) to this index."""
        for key, sig in zip(other._keys, other._sigs, strict=True):
            self.add(key, sig)


def _band_keys(sig: np.ndarray) -> list[bytes]:
    raw = sig.tobytes()
    width = ROWS * 4
    return [bytes([i]) + raw[i * width:(i + 1) * width] for i in range(BANDS)]


def signature_to_bytes(sig: np.ndarray) -> bytes:
    return sig.astype("<u4").tobytes()


def signature_from_bytes(raw: bytes) -> np.ndarray:
    import numpy as np

    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)
