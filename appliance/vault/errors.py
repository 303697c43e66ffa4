"""Errors raised by the vault. All are `AirlockError`s: one line naming the file or object, plus a hint.

    VaultError                 base for everything below
    ├── VaultLockedError       no key agent is running (never unlocked, idle timeout, `vault lock`)
    ├── VaultNotInitializedError   `vault init` has not run for this AIRLOCK_HOME
    ├── UnlockError            wrong passphrase / recovery key / machine key, or a tampered slot
    ├── StreamError            an encrypted file failed authentication or has a bad header
    └── ObjectError            unknown, duplicate or shredded object; bad object or file name
"""

from __future__ import annotations

from appliance.errors import AirlockError

LOCKED_HINT = "run `airlock vault unlock` (or `airlock vault unlock --machine-key` for scheduled jobs), then retry"


class VaultError(AirlockError):
    """Base class of the vault's errors."""


class VaultLockedError(VaultError):
    """The key agent is not running, so no key can be unwrapped."""

    def __init__(self, message: str = "vault is locked", hint: str = LOCKED_HINT) -> None:
        super().__init__(message, hint)


class VaultNotInitializedError(VaultError):
    """There is no vault (no key slots) under this AIRLOCK_HOME."""


class UnlockError(VaultError):
    """A credential did not open any key slot. Deliberately says nothing about why."""


class StreamError(VaultError):
    """An AIRLOCK-STREAM-1 file is malformed or failed authentication."""


class ObjectError(VaultError):
    """An object id or file name is invalid, unknown, already present or shredded."""
