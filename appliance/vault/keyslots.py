"""Key slots: the vault's random 256-bit root key, wrapped once per way of unlocking it (LUKS-style).

    slot_key     = KDF(secret, slot's stored KDF parameters)
    wrapped_root = nonce (12) || AES-256-GCM(slot_key, nonce, root_key, aad)
    aad          = canonical JSON {"format": "airlock-slot-1", "slot_id", "kind", "kdf"}

Kinds: `passphrase` (Argon2id, scrypt where OpenSSL lacks Argon2), `recovery` (a random key
printed once at `vault init`) and `machine` (a 0600 root-only key file for unattended jobs).
The latter two are high-entropy, so HKDF is enough for them. Binding the KDF parameters into the
AAD means nobody can weaken a slot's parameters without breaking it. Every parameter read back
from the catalog is capped before use, so an edited slot cannot make unlock allocate 1 TiB.
Per-user passphrase slots (issue 12) are just more rows with their own slot ids.

No catalog access here: appliance.vault.records stores slots, appliance.vault.lifecycle uses them.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from appliance.vault.errors import VaultError

SLOT_FORMAT = "airlock-slot-1"
SLOT_KINDS = ("passphrase", "recovery", "machine")
KEY_SIZE = 32
NONCE_SIZE = 12
KDF_PROFILE_ENV = "AIRLOCK_KDF_PROFILE"  # "test" = tiny parameters; test suite in a source checkout only

# Defaults for a passphrase slot. Memory starts here and doubles (up to the max) while a derive
# stays under half the target; then iterations fill the target time. See tune_argon2id.
DEFAULT_MEMORY_MIB = 256
MAX_DEFAULT_MEMORY_MIB = 1024
DEFAULT_LANES = 4
TARGET_UNLOCK_SECONDS = 1.0
SCRYPT_DEFAULT = {"n": 1 << 18, "r": 8, "p": 1}  # 256 MiB
TEST_ARGON2 = {"memory_kib": 8 * 1024, "iterations": 1, "lanes": 1}
TEST_SCRYPT = {"n": 1 << 10, "r": 8, "p": 1}
WEAK_BELOW_MEMORY_KIB = 64 * 1024  # OWASP's floor for Argon2id is 19-46 MiB; our defaults start at 256 MiB

# Caps on parameters read from a slot (an edited slot must not exhaust the machine).
_CAPS = {"memory_kib": 4 * 1024 * 1024, "iterations": 64, "lanes": 64, "n": 1 << 22, "r": 32, "p": 16}
_HKDF_INFO = b"airlock key slot\x00"


@dataclass(frozen=True)
class KdfParams:
    """How a slot's key is derived from its secret. Stored next to the slot, bound as AAD."""

    name: str  # "argon2id" | "scrypt" | "hkdf-sha256"
    salt: bytes
    memory_kib: int = 0
    iterations: int = 0
    lanes: int = 0
    n: int = 0
    r: int = 0
    p: int = 0

    def __post_init__(self) -> None:
        if self.name not in ("argon2id", "scrypt", "hkdf-sha256"):
            raise ValueError(f"unknown KDF {self.name!r}")
        if not 16 <= len(self.salt) <= 64:
            raise ValueError("salt must be 16..64 bytes")
        for field, cap in _CAPS.items():
            if not 0 <= getattr(self, field) <= cap:
                raise ValueError(f"KDF parameter {field}={getattr(self, field)} outside [0, {cap}]")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["salt"] = base64.b64encode(self.salt).decode("ascii")
        return {k: v for k, v in data.items() if v or k in ("name", "salt")}

    @classmethod
    def from_dict(cls, data: dict) -> KdfParams:
        fields = {k: data[k] for k in ("name", "memory_kib", "iterations", "lanes", "n", "r", "p") if k in data}
        if not all(isinstance(v, int) for k, v in fields.items() if k != "name"):
            raise ValueError("KDF parameters must be integers")
        return cls(salt=base64.b64decode(data["salt"], validate=True), **fields)

    def describe(self) -> dict:
        """For audit rows and `vault status`: the parameters without the salt."""
        return {k: v for k, v in self.to_dict().items() if k != "salt"}


@dataclass(frozen=True)
class KeySlot:
    slot_id: str
    kind: str
    kdf: KdfParams
    wrapped_root: bytes


def argon2id_available() -> bool:
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    try:
        Argon2id(salt=b"\x00" * 16, length=32, iterations=1, lanes=1, memory_cost=8).derive(b"probe")
    except UnsupportedAlgorithm:
        return False
    return True


def passphrase_kdf(*, memory_mib: int | None = None, kdf: str | None = None) -> KdfParams:
    """Parameters for a new passphrase slot.

    Default: Argon2id tuned to about TARGET_UNLOCK_SECONDS on this machine (256 MiB - 1 GiB).
    `memory_mib` fixes the memory (1 iteration, 1 lane below 64 MiB). AIRLOCK_KDF_PROFILE=test
    selects tiny parameters and is for the test suite only: it makes a passphrase cheap to guess,
    so it is refused outside a source checkout (see `test_profile_requested`).
    """
    salt = os.urandom(16)
    name = kdf or ("argon2id" if argon2id_available() else "scrypt")
    test_profile = test_profile_requested()
    if name == "scrypt":
        params = TEST_SCRYPT if test_profile else SCRYPT_DEFAULT
        if memory_mib is not None:
            # scrypt uses 128 * r * n bytes and needs n to be a power of two.
            params = {"n": 1 << ((memory_mib * 1024 * 1024 // (128 * 8)).bit_length() - 1), "r": 8, "p": 1}
        return KdfParams("scrypt", salt, **params)
    if memory_mib is not None:
        lanes = 1 if memory_mib < 64 else DEFAULT_LANES
        return KdfParams("argon2id", salt, memory_kib=memory_mib * 1024, iterations=1, lanes=lanes)
    if test_profile:
        return KdfParams("argon2id", salt, **TEST_ARGON2)
    return tune_argon2id(salt)


def test_profile_requested() -> bool:
    """True when AIRLOCK_KDF_PROFILE=test asks for the tiny test parameters *and* that is allowed.

    Allowed only where the test suite runs: a source checkout, with AIRLOCK_HOME elsewhere than the
    installed /var/lib/airlock. On an installed appliance the variable is refused (fail closed): a
    stray export in a service unit or shell profile must not give the site 8 MiB passphrase slots.
    Any other value is refused too, rather than silently ignored.
    """
    from appliance.paths import INSTALLED_HOME, airlock_home, source_checkout

    value = os.environ.get(KDF_PROFILE_ENV)
    if value is None or value == "":
        return False
    if value != "test":
        raise VaultError(f"{KDF_PROFILE_ENV}={value!r} is not a KDF profile",
                         hint=f"unset {KDF_PROFILE_ENV}: the default parameters are tuned to this machine")
    if source_checkout() is None or airlock_home() == INSTALLED_HOME:
        raise VaultError(f"{KDF_PROFILE_ENV}=test (tiny, guessable KDF parameters for the test suite) is refused on "
                         "an installed appliance",
                         hint=f"unset {KDF_PROFILE_ENV} (check the shell profile and service units) and run the "
                              "command again")
    return True


def is_weak(kdf: KdfParams) -> bool:
    """A passphrase slot far below the defaults (the test profile, or a tiny --kdf-memory-mib): `doctor` flags it."""
    if kdf.name == "argon2id":
        return kdf.memory_kib < WEAK_BELOW_MEMORY_KIB
    if kdf.name == "scrypt":
        return 128 * kdf.r * kdf.n < WEAK_BELOW_MEMORY_KIB * 1024
    return False  # hkdf: slots of 256-bit random secrets


def tune_argon2id(salt: bytes, target_s: float = TARGET_UNLOCK_SECONDS) -> KdfParams:
    memory_mib, elapsed = DEFAULT_MEMORY_MIB, 0.0
    while True:
        params = KdfParams("argon2id", salt, memory_kib=memory_mib * 1024, iterations=1, lanes=DEFAULT_LANES)
        started = time.perf_counter()
        derive_slot_key(params, b"tuning")
        elapsed = time.perf_counter() - started
        if elapsed >= target_s / 2 or memory_mib >= MAX_DEFAULT_MEMORY_MIB:
            break
        memory_mib *= 2
    iterations = max(1, min(10, round(target_s / max(elapsed, 1e-3))))
    return KdfParams("argon2id", salt, memory_kib=memory_mib * 1024, iterations=iterations, lanes=DEFAULT_LANES)


def hkdf_params() -> KdfParams:
    return KdfParams("hkdf-sha256", os.urandom(32))


def derive_slot_key(kdf: KdfParams, secret: bytes) -> bytes:
    if kdf.name == "argon2id":
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

        return Argon2id(salt=kdf.salt, length=KEY_SIZE, iterations=kdf.iterations, lanes=kdf.lanes,
                        memory_cost=kdf.memory_kib).derive(secret)
    if kdf.name == "scrypt":
        return Scrypt(salt=kdf.salt, length=KEY_SIZE, n=kdf.n, r=kdf.r, p=kdf.p).derive(secret)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=kdf.salt, info=_HKDF_INFO).derive(secret)


def slot_aad(slot_id: str, kind: str, kdf: KdfParams) -> bytes:
    doc = {"format": SLOT_FORMAT, "slot_id": slot_id, "kind": kind, "kdf": kdf.to_dict()}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def wrap_root(root_key: bytes, *, slot_id: str, kind: str, kdf: KdfParams, secret: bytes) -> KeySlot:
    if kind not in SLOT_KINDS:
        raise ValueError(f"unknown slot kind {kind!r}")
    nonce = os.urandom(NONCE_SIZE)
    sealed = AESGCM(derive_slot_key(kdf, secret)).encrypt(nonce, root_key, slot_aad(slot_id, kind, kdf))
    return KeySlot(slot_id, kind, kdf, nonce + sealed)


def unwrap_root(slot: KeySlot, secret: bytes) -> bytes | None:
    """The root key, or None when the secret (or the slot) is wrong: callers must not say which."""
    if len(slot.wrapped_root) != NONCE_SIZE + KEY_SIZE + 16:
        return None
    nonce, sealed = slot.wrapped_root[:NONCE_SIZE], slot.wrapped_root[NONCE_SIZE:]
    try:
        return AESGCM(derive_slot_key(slot.kdf, secret)).decrypt(nonce, sealed, slot_aad(slot.slot_id, slot.kind,
                                                                                         slot.kdf))
    except InvalidTag:
        return None


def new_recovery_key() -> tuple[bytes, str]:
    """32 random bytes, shown as base32 in dash-separated groups of four for the site's safe."""
    secret = os.urandom(KEY_SIZE)
    text = base64.b32encode(secret).decode("ascii").rstrip("=")
    return secret, "-".join(text[i:i + 4] for i in range(0, len(text), 4))


def parse_recovery_key(text: str) -> bytes:
    compact = "".join(ch for ch in text.upper() if ch.isalnum())
    try:
        secret = base64.b32decode(compact + "=" * (-len(compact) % 8))
    except ValueError:
        secret = b""
    if len(secret) != KEY_SIZE:
        # Deliberately the same wording as a wrong key: the caller raises the generic unlock error.
        return b""
    return secret


def create_machine_key(path: Path) -> bytes:
    """Write a new 32-byte machine key file, 0600, refusing to overwrite one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = os.urandom(KEY_SIZE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise VaultError(f"machine key file {path} already exists",
                         hint="choose another --machine-key-file, or remove the old file if no slot uses it") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
        handle.flush()
        os.fsync(handle.fileno())
    return secret


def read_machine_key(path: Path) -> bytes:
    """Read a machine key file, refusing one that anyone but its owner (us) could read or replace."""
    try:
        info = path.stat()
        if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise VaultError(f"machine key file {path} must be owned by this account and mode 0600",
                             hint=f"run `chown {os.geteuid()} {path} && chmod 600 {path}` if you trust the file")
        secret = path.read_bytes()
    except OSError as exc:
        raise VaultError(f"cannot read machine key file {path}: {exc.strerror}",
                         hint="run this as the account that owns the key file (root on an installed appliance)") \
            from None
    return secret
