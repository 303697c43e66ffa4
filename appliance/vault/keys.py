"""KEKs and DEKs: root key -> versioned KEKs -> one random DEK per object (dataset, model artifact).

    wrapped_kek = nonce || AES-256-GCM(root_key, nonce, kek, aad = "airlock-kek-1" 0x00 version)
    wrapped_dek = nonce || AES-256-GCM(kek, nonce, dek, aad = "airlock-dek-1" 0x00 version 0x00 object_id)

Binding the object id and KEK version means a wrapped DEK copied onto another object's row, or
relabelled with another KEK version, fails to unwrap. `LocalKeys` holds a root key in this
process: the key agent uses it, and so do the few commands that open a slot themselves (init,
passwd, add-slot). Everything else talks to the agent through the same `KeyOps` methods, so the
root key never leaves the agent.
"""

from __future__ import annotations

import os
import resource
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.vault.errors import VaultError

KEY_SIZE = 32
NONCE_SIZE = 12
WRAPPED_SIZE = NONCE_SIZE + KEY_SIZE + 16


class KeyOps(Protocol):
    """What a process may ask of whoever holds the root key (the agent, or LocalKeys)."""

    def new_kek(self, version: int) -> bytes: ...

    def new_dek(self, kek_version: int, wrapped_kek: bytes, object_id: str) -> tuple[bytes, bytes]: ...

    def unwrap_dek(self, kek_version: int, wrapped_kek: bytes, object_id: str, wrapped_dek: bytes) -> bytes: ...

    def rewrap_dek(self, old_version: int, old_wrapped_kek: bytes, new_version: int, new_wrapped_kek: bytes,
                   object_id: str, wrapped_dek: bytes) -> bytes: ...


def kek_aad(version: int) -> bytes:
    return b"airlock-kek-1\x00" + str(version).encode("ascii")


def dek_aad(object_id: str, kek_version: int) -> bytes:
    return b"airlock-dek-1\x00" + str(kek_version).encode("ascii") + b"\x00" + object_id.encode("utf-8")


def wrap_key(wrapping_key: bytes, key: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(wrapping_key).encrypt(nonce, key, aad)


def unwrap_key(wrapping_key: bytes, wrapped: bytes, aad: bytes, what: str) -> bytes:
    if len(wrapped) != WRAPPED_SIZE:
        raise VaultError(f"{what} is damaged (wrong length)", hint="restore the catalog from a backup")
    try:
        return AESGCM(wrapping_key).decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], aad)
    except InvalidTag:
        raise VaultError(f"{what} does not unwrap: it was edited, moved to another object, or belongs to another "
                         "vault", hint="restore the catalog from a backup; tell your security office") from None


class LocalKeys:
    """The root key held in this process. `wipe()` zeroes our copy (best effort: see the ADR)."""

    def __init__(self, root_key: bytes) -> None:
        if len(root_key) != KEY_SIZE:
            raise ValueError("the root key is 32 bytes")
        self._root = bytearray(root_key)

    def _root_key(self) -> bytes:
        if not any(self._root):
            raise VaultError("the key holder was wiped", hint="run `airlock vault unlock` again")
        return bytes(self._root)

    def _kek(self, version: int, wrapped_kek: bytes) -> bytes:
        return unwrap_key(self._root_key(), wrapped_kek, kek_aad(version), f"KEK version {version}")

    def new_kek(self, version: int) -> bytes:
        return wrap_key(self._root_key(), os.urandom(KEY_SIZE), kek_aad(version))

    def new_dek(self, kek_version: int, wrapped_kek: bytes, object_id: str) -> tuple[bytes, bytes]:
        dek = os.urandom(KEY_SIZE)
        return dek, wrap_key(self._kek(kek_version, wrapped_kek), dek, dek_aad(object_id, kek_version))

    def unwrap_dek(self, kek_version: int, wrapped_kek: bytes, object_id: str, wrapped_dek: bytes) -> bytes:
        return unwrap_key(self._kek(kek_version, wrapped_kek), wrapped_dek, dek_aad(object_id, kek_version),
                          f"the data key of object {object_id}")

    def rewrap_dek(self, old_version: int, old_wrapped_kek: bytes, new_version: int, new_wrapped_kek: bytes,
                   object_id: str, wrapped_dek: bytes) -> bytes:
        dek = self.unwrap_dek(old_version, old_wrapped_kek, object_id, wrapped_dek)
        return wrap_key(self._kek(new_version, new_wrapped_kek), dek, dek_aad(object_id, new_version))

    def wrap_dek(self, kek_version: int, wrapped_kek: bytes, object_id: str, dek: bytes) -> bytes:
        """Wrap a DEK that came from elsewhere (`vault rekey`: a DEK unwrapped under the old root key)."""
        return wrap_key(self._kek(kek_version, wrapped_kek), dek, dek_aad(object_id, kek_version))

    def wipe(self) -> None:
        for i in range(len(self._root)):
            self._root[i] = 0


def disable_core_dumps() -> None:
    """A process that holds keys must never write them to a core file."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
