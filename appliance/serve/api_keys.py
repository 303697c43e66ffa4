"""API keys for the inference server: created once, shown once, stored only as a SHA-256 hash.

    key = create_key(db, "pacs-bridge", tasks=["chest-xray"])   # the only time the secret exists in full
    found = authenticate(db, "Bearer airlock_3f9c0a1b2c4d_...")  # ApiKey, or RequestRefused(401)

A key is `airlock_<key id>_<secret>`: the key id (48 random bits, public) finds the row without
searching by secret, and the secret is 256 random bits. The catalog keeps SHA-256 of the whole key,
compared with `hmac.compare_digest`. No slow KDF: a KDF protects guessable passwords, and 256 random
bits cannot be guessed at any hashing speed, while a KDF on every request would cost the server as
much CPU as inference (see docs/adr/0008-serving.md). A key may be limited to tasks (the model
names clients ask for); an empty list means every model. Revoking keeps the row for the audit trail.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from appliance.audit import append_audit, current_actor
from appliance.catalog import transaction
from appliance.serve.errors import ApiKeyError, RequestRefused

if TYPE_CHECKING:
    import sqlite_utils

PREFIX = "airlock"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_PATTERN = re.compile(r"^airlock_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
MAX_HEADER_CHARS = 256
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()
METRICS_ONLY = "METRICS-ONLY"
"""The scope of the Serve screen's monitoring key (created by an admin, kept in the vault): uppercase, so never a
registry task; it may use no model, and /metrics shows it what the server has loaded."""


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    tasks: tuple[str, ...]
    """Models (tasks) this key may use; empty = all."""
    state: str
    created_at: str
    created_by: str
    revoked_at: str | None
    revoked_by: str | None

    def allows(self, model: str) -> bool:
        return not self.tasks or model in self.tasks

    def sees_metrics_of(self, model: str) -> bool:
        """Whether /metrics shows this key `model`'s series: the models it may use; the monitoring key, every one."""
        return self.tasks == (METRICS_ONLY,) or self.allows(model)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "key_id": self.key_id, "tasks": list(self.tasks), "state": self.state,
                "created_at": self.created_at, "created_by": self.created_by, "revoked_at": self.revoked_at,
                "revoked_by": self.revoked_by}


_COLUMNS = "key_id, name, tasks, state, created_at, created_by, revoked_at, revoked_by"


def _key(row: tuple) -> ApiKey:
    return ApiKey(row[0], row[1], tuple(json.loads(row[2])), row[3], row[4], row[5], row[6], row[7])


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def create_key(db: sqlite_utils.Database, name: str, tasks: list[str] | tuple[str, ...] = (), *,
               actor: str | None = None) -> tuple[ApiKey, str]:
    """A new active key named `name`. Returns (its row, the key itself); only the hash is stored."""
    if not NAME_PATTERN.match(name):
        raise ApiKeyError(f"API key name {name!r} is not allowed",
                          hint="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, "
                               "e.g. pacs-bridge")
    for task in tasks:
        if not NAME_PATTERN.match(task):
            raise ApiKeyError(f"task {task!r} is not a model name", hint="e.g. --task chest-xray (see /v1/models)")
    actor = actor or current_actor()
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    with transaction(db):
        if find_active(db, name) is not None:
            raise ApiKeyError(f"an active API key named {name!r} already exists",
                              hint=f"pick another name, or revoke it first: `airlock keys revoke {name}`")
        db.execute(f"INSERT INTO api_keys ({_COLUMNS}, key_hash) VALUES (?, ?, ?, 'active', ?, ?, NULL, NULL, ?)",
                   [key_id, name, json.dumps(sorted(set(tasks))), _now(), actor, key_hash(key)])
        append_audit(db, "keys.create", name, {"key_id": key_id, "tasks": sorted(set(tasks))}, actor=actor)
    found = find_active(db, name)
    assert found is not None
    return found, key


def find_active(db: sqlite_utils.Database, name: str) -> ApiKey | None:
    row = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE name = ? AND state = 'active'", [name]).fetchone()
    return _key(row) if row else None


def list_keys(db: sqlite_utils.Database) -> list[ApiKey]:
    return [_key(r) for r in db.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY state, name, created_at")]


def revoke_key(db: sqlite_utils.Database, name: str, *, actor: str | None = None) -> ApiKey:
    """Revoke the active key named `name`; a running server refuses it from its next request on."""
    actor = actor or current_actor()
    with transaction(db):
        found = find_active(db, name)
        if found is None:
            revoked = db.execute("SELECT 1 FROM api_keys WHERE name = ?", [name]).fetchone()
            raise ApiKeyError(f"no active API key named {name!r}" + (" (it was revoked already)" if revoked else ""),
                              hint="list keys with `airlock keys list`")
        db.execute("UPDATE api_keys SET state = 'revoked', revoked_at = ?, revoked_by = ? WHERE key_id = ?",
                   [_now(), actor, found.key_id])
        append_audit(db, "keys.revoke", name, {"key_id": found.key_id}, actor=actor)
    row = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", [found.key_id]).fetchone()
    return _key(row)


def authenticate(db: sqlite_utils.Database, authorization: str | None) -> ApiKey:
    """The active key presented as `Authorization: Bearer KEY`, or RequestRefused(401).

    The secret is compared as a hash with `hmac.compare_digest`; an unknown key id still hashes and
    compares, so the answer takes the same time whether or not the id exists.
    """
    if not authorization:
        raise RequestRefused(401, "missing_api_key", "no API key: send the header 'Authorization: Bearer KEY'")
    scheme, _, presented = authorization.strip().partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented or len(authorization) > MAX_HEADER_CHARS:
        raise RequestRefused(401, "invalid_api_key", "the Authorization header is not 'Bearer KEY'")
    match = _KEY_PATTERN.match(presented)
    row = None
    if match:
        row = db.execute(f"SELECT {_COLUMNS}, key_hash FROM api_keys WHERE key_id = ?", [match.group(1)]).fetchone()
    digest = key_hash(presented) if presented.isascii() else _DUMMY_HASH
    stored = row[8] if row else _DUMMY_HASH
    if not (hmac.compare_digest(digest, stored) and row is not None):
        raise RequestRefused(401, "invalid_api_key", "this API key is not valid")
    found = _key(row[:8])
    if found.state != "active":
        raise RequestRefused(401, "revoked_api_key", f"the API key {found.name!r} was revoked")
    return found
