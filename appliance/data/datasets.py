"""The datasets' catalog rows: datasets, versions, and one row per record (hash, split, location).

Metadata only: record contents, file names and per-file outcomes live encrypted in the dataset's
vault object. Writers run inside the caller's `catalog.transaction(db)`, next to the audit row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from appliance.data.errors import DataError

if TYPE_CHECKING:
    import sqlite_utils

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Dataset:
    id: str
    """Also the vault object id that holds the dataset's shards (one DEK per dataset)."""
    name: str
    kind: str
    profile: str
    split_seed: str
    split_spec: str
    state: str
    created_at: str
    created_by: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "kind": self.kind, "profile": self.profile,
                "splits": self.split_spec, "state": self.state, "created_at": self.created_at,
                "created_by": self.created_by}


@dataclass(frozen=True)
class DatasetVersion:
    version: int
    shard_prefix: str
    job_id: str
    created_at: str
    created_by: str
    records_added: int
    shards: int
    content_hash: str
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "job_id": self.job_id, "created_at": self.created_at,
                "created_by": self.created_by, "records_added": self.records_added,
                "content_hash": self.content_hash, "summary": self.summary}


@dataclass(frozen=True)
class RecordRow:
    content_hash: str
    version: int
    split: str
    shard: int
    position: int
    group_key: str
    label: str | None
    minhash: bytes | None


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise DataError(f"dataset name {name!r} is not allowed",
                        hint="use 1-64 lowercase letters, digits, '.', '_' or '-', e.g. radiology-reports")
    return name


_DATASET_COLUMNS = "id, name, kind, profile, split_seed, split_spec, state, created_at, created_by"


def find(db: sqlite_utils.Database, name: str, *, include_importing: bool = False) -> Dataset | None:
    states = ("active", "importing") if include_importing else ("active",)
    marks = ",".join("?" * len(states))
    row = db.execute(f"SELECT {_DATASET_COLUMNS} FROM datasets WHERE name = ? AND state IN ({marks})",
                     [name, *states]).fetchone()
    return Dataset(*row) if row else None


def get(db: sqlite_utils.Database, name: str) -> Dataset:
    found = find(db, check_name(name))
    if found is None:
        raise DataError(f"no dataset named {name!r}", hint="list datasets with `airlock data list`")
    return found


def all_datasets(db: sqlite_utils.Database, states: Iterable[str] = ("active",)) -> list[Dataset]:
    states = tuple(states)
    rows = db.execute(f"SELECT {_DATASET_COLUMNS} FROM datasets WHERE state IN ({','.join('?' * len(states))})"
                      " ORDER BY name", list(states))
    return [Dataset(*r) for r in rows]


def insert(db: sqlite_utils.Database, dataset: Dataset) -> None:
    db.execute(f"INSERT INTO datasets ({_DATASET_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               [dataset.id, dataset.name, dataset.kind, dataset.profile, dataset.split_seed, dataset.split_spec,
                dataset.state, dataset.created_at, dataset.created_by])


def set_state(db: sqlite_utils.Database, dataset_id: str, state: str) -> None:
    db.execute("UPDATE datasets SET state = ?, deleted_at = CASE WHEN ? = 'deleted' THEN ? ELSE deleted_at END"
               " WHERE id = ?", [state, state, now(), dataset_id])


def versions(db: sqlite_utils.Database, dataset_id: str) -> list[DatasetVersion]:
    rows = db.execute("SELECT version, shard_prefix, job_id, created_at, created_by, records_added, shards,"
                      " content_hash, summary FROM dataset_versions WHERE dataset_id = ? ORDER BY version",
                      [dataset_id])
    return [DatasetVersion(*r[:8], json.loads(r[8])) for r in rows]


def shard_prefixes(db: sqlite_utils.Database, dataset_id: str) -> set[str]:
    return {r[0] for r in db.execute("SELECT shard_prefix FROM dataset_versions WHERE dataset_id = ?", [dataset_id])}


def insert_version(db: sqlite_utils.Database, dataset_id: str, version: DatasetVersion) -> None:
    db.execute("INSERT INTO dataset_versions (dataset_id, version, shard_prefix, job_id, created_at, created_by,"
               " records_added, shards, content_hash, summary) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               [dataset_id, version.version, version.shard_prefix, version.job_id, version.created_at,
                version.created_by, version.records_added, version.shards, version.content_hash,
                json.dumps(version.summary, sort_keys=True)])


def insert_records(db: sqlite_utils.Database, dataset_id: str, rows: Iterable[RecordRow]) -> None:
    db.conn.executemany(
        "INSERT INTO dataset_records (dataset_id, content_hash, version, split, shard, position, group_key, label,"
        " minhash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ((dataset_id, r.content_hash, r.version, r.split, r.shard, r.position, r.group_key, r.label, r.minhash)
         for r in rows))


def records(db: sqlite_utils.Database, dataset_id: str, *, split: str | None = None,
            max_version: int | None = None, min_version: int | None = None) -> Iterator[RecordRow]:
    """Record rows in storage order (version, shard, position): the order training reads them."""
    sql = ("SELECT content_hash, version, split, shard, position, group_key, label, minhash FROM dataset_records"
           " WHERE dataset_id = ?")
    params: list[Any] = [dataset_id]
    if split:
        sql += " AND split = ?"
        params.append(split)
    if max_version is not None:
        sql += " AND version <= ?"
        params.append(max_version)
    if min_version is not None:
        sql += " AND version >= ?"
        params.append(min_version)
    for r in db.execute(sql + " ORDER BY version, shard, position", params):
        yield RecordRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bytes(r[7]) if r[7] is not None else None)


def split_counts(db: sqlite_utils.Database, dataset_id: str) -> dict[str, int]:
    rows = db.execute("SELECT split, COUNT(*) FROM dataset_records WHERE dataset_id = ? GROUP BY split", [dataset_id])
    counts = {"train": 0, "val": 0, "test": 0}
    counts.update({r[0]: r[1] for r in rows})
    return counts


def label_counts(db: sqlite_utils.Database, dataset_id: str) -> dict[str, dict[str, int]]:
    """{label: {split: count}} for image datasets (labels are class names, not PHI)."""
    out: dict[str, dict[str, int]] = {}
    for label, split, count in db.execute("SELECT COALESCE(label, ''), split, COUNT(*) FROM dataset_records"
                                          " WHERE dataset_id = ? GROUP BY 1, 2 ORDER BY 1, 2", [dataset_id]):
        out.setdefault(label, {})[split] = count
    return out


def delete_records(db: sqlite_utils.Database, dataset_id: str) -> None:
    db.execute("DELETE FROM dataset_records WHERE dataset_id = ?", [dataset_id])
