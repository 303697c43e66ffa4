"""The bundle manifest: canonical JSON, its ECDSA P-256 signature, and the trust decision.

This is the only bundler module the appliance imports (for `airlock upgrade`), so it stays small
and imports nothing heavy. The trust-critical core, `verify_manifest`, does no I/O: it takes the
manifest bytes, the detached signature and the signer's public key, and in this fixed order

  1. caps every input length,
  2. checks the signer key is EC P-256 and verifies the signature over the exact bytes,
  3. parses the JSON strictly (duplicate keys, NaN, non-canonical form all refused),
  4. validates the schema: exact keys, types, capped lengths, safe relative paths, no duplicates,
  5. decides trust: the signer's fingerprint is pinned, or a key-rotation statement in the
     manifest is signed by a pinned key and names this signer,
  6. refuses an expired bundle,

and returns a frozen `Manifest`. `verify_bundle` is the single I/O entry point: it reads the
three root files without following symlinks, calls the core, then checks every file on disk
(`bundler.verify`). See docs/adr/0004-bundle-trust.md.

Paths are restricted to `[A-Za-z0-9._+-]` segments joined by `/` (no `..`, no leading dot or
dash): install.sh reads the same manifest with sed, and this alphabet keeps the two parsers
agreeing by construction.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bundler.errors import BundleError

FORMAT = "airlock-bundle/1"
ROTATION_FORMAT = "airlock-key-rotation/1"
MANIFEST_NAME = "MANIFEST.json"
SIGNATURE_NAME = "MANIFEST.json.sig"
SIGNER_KEY_NAME = "signer.pub.pem"
# The three files at the bundle root that the manifest cannot list (it is signed, they sign it).
UNLISTED = (MANIFEST_NAME, SIGNATURE_NAME, SIGNER_KEY_NAME)

MAX_MANIFEST_BYTES = 16 * 2**20
MAX_SIGNATURE_BYTES = 256
MAX_KEY_BYTES = 4096
MAX_FILES = 100_000
MAX_PATH = 255
MAX_TEXT = 128
MAX_SIZE = 2**50
_SEGMENT = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,63}")
_PLATFORM = re.compile(r"manylinux(_2_[0-9]{1,3}|1|2010|2014)_(x86_64|aarch64)")

_TOP_KEYS = {"bundle_id", "created", "expires", "files", "format", "key_rotation", "lock", "models", "product",
             "sbom", "sequence", "signer", "split_files", "target", "version"}
# Only a differential bundle has this key: a full bundle's manifest is what it always was, so an
# installed release that predates differential bundles still verifies (and installs) full ones.
DIFFERENTIAL_KEY = "differential"
_DIFFERENTIAL_KEYS = {"base_bundle_id", "base_version", "held"}
_HOLDABLE = re.compile(r"wheels/[^/]+\.whl|models/.+")
"""What a differential bundle may leave out: wheels and model files (install.sh runs from the stick,
and the security office reads the SBOM and the lock there)."""
_TARGET_KEYS = {"arch", "cuda_major", "glibc_min", "min_driver", "platforms", "python_version"}
# Only GPU bundles whose spec names it carry this target key (older releases verify the others).
MIN_CC_KEY = "min_compute_capability"
_FILE_KEYS = {"path", "sha256", "size"}
_SPLIT_KEYS = {"parts", "path", "sha256", "size"}
_MODEL_KEYS = {"name", "path"}
_ROTATION_KEYS = {"old_public_key", "signature", "statement"}
_STATEMENT_KEYS = {"format", "new_fingerprint", "old_fingerprint", "product"}


@dataclass(frozen=True)
class FileEntry:
    """One regular file in the bundle (a part counts as one)."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SplitFile:
    """A file over the split threshold: shipped as `parts`, reassembled to `path` with `sha256`."""

    path: str
    size: int
    sha256: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """The machine a bundle is built for."""

    arch: str
    python_version: str
    platforms: tuple[str, ...]
    glibc_min: str
    cuda_major: int  # 0 = CPU-only bundle
    min_driver: int  # 0 = no NVIDIA driver needed
    min_compute_capability: str = ""  # "" = not checked; else like "7.5"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: str  # directory under models/


@dataclass(frozen=True)
class KeyRotation:
    """A statement, signed by the old key, that `new_fingerprint` signs for `product` from now on."""

    old_fingerprint: str
    new_fingerprint: str


@dataclass(frozen=True)
class Differential:
    """A differential bundle ships only what changed since `base_bundle_id`; the target must already hold
    `held` (listed files whose bytes come from the installed base release, checked by their listed SHA-256)."""

    base_bundle_id: str
    base_version: str
    held: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """A manifest whose signature and schema have been verified (only `verify_manifest` makes one from bytes)."""

    product: str
    version: str
    sequence: int
    bundle_id: str
    created: str
    expires: str
    signer: str
    target: Target
    files: tuple[FileEntry, ...]
    split_files: tuple[SplitFile, ...]
    models: tuple[ModelEntry, ...]
    lock: str
    sbom: str
    key_rotation: KeyRotation | None = None
    differential: Differential | None = None

    @property
    def payload_bytes(self) -> int:
        """Bytes the bundle carries (held files of a differential bundle are not on the stick)."""
        held = set(self.differential.held) if self.differential else set()
        return sum(f.size for f in self.files if f.path not in held)

    @property
    def full_bytes(self) -> int:
        """Bytes of every listed file, held or shipped: what the release installs from."""
        return sum(f.size for f in self.files)

    def held_entries(self) -> tuple[FileEntry, ...]:
        """The listed files a differential bundle leaves out (empty for a full bundle)."""
        if self.differential is None:
            return ()
        held = set(self.differential.held)
        return tuple(f for f in self.files if f.path in held)


# ---------------------------------------------------------------- canonical form and keys


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII only: one byte string per value (what is signed)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def load_public_key(pem: bytes, what: str = SIGNER_KEY_NAME) -> ec.EllipticCurvePublicKey:
    if len(pem) > MAX_KEY_BYTES:
        raise BundleError(f"{what}: public key file is over {MAX_KEY_BYTES} bytes", hint="the bundle is corrupt")
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise BundleError(f"{what}: not a PEM public key", hint="the bundle is corrupt or tampered with") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise BundleError(f"{what}: not an ECDSA P-256 public key", hint="bundles are signed with P-256 keys only")
    return key


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, lowercase hex (= `openssl pkey -pubin -outform DER | sha256sum`)."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Accept `AB:CD:..` or plain hex, any case; return 64 lowercase hex or raise."""
    value = text.strip().replace(":", "").lower()
    if not _HEX64.fullmatch(value):
        raise BundleError(f"{text!r} is not a key fingerprint (64 hex digits)",
                          hint="copy the fingerprint `airlock-bundle keygen` printed, or pass a public key file")
    return value


def _verify_signature(key: ec.EllipticCurvePublicKey, data: bytes, signature: bytes) -> bool:
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# ---------------------------------------------------------------- the core (no I/O)


def verify_manifest(manifest_bytes: bytes, signature: bytes, signer_pem: bytes, trusted: frozenset[str] | set[str],
                    *, today: date | None = None) -> Manifest:
    """Verify a manifest against pinned fingerprints; see the module docstring for the order."""
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST_NAME}: over {MAX_MANIFEST_BYTES} bytes", hint="the bundle is corrupt")
    if not 8 <= len(signature) <= MAX_SIGNATURE_BYTES:
        raise BundleError(f"{SIGNATURE_NAME}: not an ECDSA signature ({len(signature)} bytes)",
                          hint="the bundle is corrupt or tampered with; copy it again from the build station")
    key = load_public_key(signer_pem)
    signer = fingerprint(key)
    if not _verify_signature(key, manifest_bytes, signature):
        raise BundleError(f"{MANIFEST_NAME}: signature does not verify with {SIGNER_KEY_NAME} ({signer[:16]}…)",
                          hint="the manifest or its signature was altered; copy the bundle again and re-verify")
    data = _parse_canonical(manifest_bytes)
    manifest = _build_manifest(data)
    if manifest.signer != signer:
        raise BundleError(f"{MANIFEST_NAME}: names signer {manifest.signer[:16]}… but {SIGNER_KEY_NAME} is "
                          f"{signer[:16]}…", hint="the bundle is tampered with")
    if signer not in trusted:
        rotation = data["key_rotation"]
        if rotation is None:
            raise BundleError(f"{SIGNER_KEY_NAME}: signing key {signer} is not trusted",
                              hint="check the fingerprint against the site's paper record; pass the right one "
                                   "with --trust")
        _verify_rotation(rotation, manifest.product, signer, trusted)
    if (today or date.today()).isoformat() > manifest.expires:
        raise BundleError(f"{MANIFEST_NAME}: bundle expired on {manifest.expires}",
                          hint="ask the build station for a fresh bundle (or check this machine's clock)")
    return manifest


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BundleError(f"{MANIFEST_NAME}: duplicate key {key!r}", hint="the bundle is tampered with")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise BundleError(f"{MANIFEST_NAME}: {name} is not allowed", hint="the bundle is tampered with")


def _parse_canonical(manifest_bytes: bytes) -> dict[str, Any]:
    try:
        data = json.loads(manifest_bytes.decode("ascii"), object_pairs_hook=_reject_duplicates,
                          parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{MANIFEST_NAME}: not ASCII JSON", hint="the bundle is corrupt") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{MANIFEST_NAME}: not a JSON object", hint="the bundle is corrupt")
    # install.sh reads this same file with sed: only the one canonical spelling is acceptable.
    if canonical_json(data) != manifest_bytes:
        raise BundleError(f"{MANIFEST_NAME}: not in canonical form", hint="rebuild it with airlock-bundle")
    return data


def _fail(where: str, what: str) -> BundleError:
    return BundleError(f"{MANIFEST_NAME}: {where}: {what}", hint="the bundle is corrupt or was not built by "
                                                                  "airlock-bundle; do not install it")


def _keys(obj: Any, expected: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or set(obj) != expected:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise _fail(where, f"expected keys {sorted(expected)}, got {got}")
    return obj


def _text(value: Any, where: str, pattern: re.Pattern[str] | None = None, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value or len(value) > limit or (pattern and not pattern.fullmatch(value)):
        raise _fail(where, f"bad value {str(value)[:80]!r}")
    return value


def _int(value: Any, where: str, limit: int = MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise _fail(where, f"bad number {str(value)[:40]!r}")
    return value


def check_path(path: Any, where: str = "path") -> str:
    """A safe relative path: `[A-Za-z0-9._+-]` segments, no `..`, not absolute, no backslash."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH:
        raise _fail(where, f"bad path {str(path)[:80]!r}")
    if path.startswith("/") or "\\" in path or ".." in path:
        raise _fail(path, "absolute path, backslash or '..' is not allowed")
    if not all(_SEGMENT.fullmatch(segment) for segment in path.split("/")):
        raise _fail(path, "path has characters outside [A-Za-z0-9._+-] or an empty/hidden segment")
    return path


def _list(value: Any, where: str, limit: int = MAX_FILES) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise _fail(where, "expected a list (capped)")
    return value


def _build_manifest(data: dict[str, Any]) -> Manifest:
    _keys(data, _TOP_KEYS | ({DIFFERENTIAL_KEY} if DIFFERENTIAL_KEY in data else set()), "top level")
    if data["format"] != FORMAT:
        raise _fail("format", f"{str(data['format'])[:40]!r} is not {FORMAT!r}")
    seen: set[str] = set()
    files = []
    for i, raw in enumerate(_list(data["files"], "files")):
        entry = _keys(raw, _FILE_KEYS, f"files[{i}]")
        path = check_path(entry["path"])
        if path in seen or path in UNLISTED:
            raise _fail(path, "listed twice (or shadows a root file)")
        seen.add(path)
        files.append(FileEntry(path, _int(entry["size"], path), _text(entry["sha256"], path, _HEX64)))
    split_files = []
    for i, raw in enumerate(_list(data["split_files"], "split_files")):
        entry = _keys(raw, _SPLIT_KEYS, f"split_files[{i}]")
        path = check_path(entry["path"])
        parts = tuple(check_path(p) for p in _list(entry["parts"], path, 10_000))
        if path in seen or not parts or any(p not in seen for p in parts) or len(set(parts)) != len(parts):
            raise _fail(path, "split file clashes with a file or names parts that are not listed")
        seen.add(path)
        split_files.append(SplitFile(path, _int(entry["size"], path), _text(entry["sha256"], path, _HEX64), parts))
    target_raw = _keys(data["target"], _TARGET_KEYS | ({MIN_CC_KEY} if isinstance(data["target"], dict)
                                                       and MIN_CC_KEY in data["target"] else set()), "target")
    target = Target(
        arch=_text(target_raw["arch"], "target.arch", re.compile(r"x86_64|aarch64")),
        python_version=_text(target_raw["python_version"], "target.python_version", re.compile(r"3\.[0-9]{1,2}")),
        platforms=tuple(_text(p, "target.platforms", _PLATFORM) for p in _list(target_raw["platforms"], "p", 64)),
        glibc_min=_text(target_raw["glibc_min"], "target.glibc_min", re.compile(r"2\.[0-9]{1,3}")),
        cuda_major=_int(target_raw["cuda_major"], "target.cuda_major", 99),
        min_driver=_int(target_raw["min_driver"], "target.min_driver", 9999),
        min_compute_capability=_text(target_raw[MIN_CC_KEY], f"target.{MIN_CC_KEY}",
                                     re.compile(r"[1-9][0-9]?\.[0-9]")) if MIN_CC_KEY in target_raw else "",
    )
    models = tuple(ModelEntry(_text(m["name"], "models.name", _NAME), check_path(m["path"]))
                   for m in (_keys(raw, _MODEL_KEYS, "models") for raw in _list(data["models"], "models", 64)))
    listed = {f.path for f in files}
    for name in ("lock", "sbom"):
        if check_path(data[name]) not in listed:
            raise _fail(name, f"{data[name]} is not a listed file")
    differential = _differential(data[DIFFERENTIAL_KEY], files, split_files) if DIFFERENTIAL_KEY in data else None
    rotation = None
    if data["key_rotation"] is not None:
        statement = _rotation_statement(data["key_rotation"])
        rotation = KeyRotation(statement["old_fingerprint"], statement["new_fingerprint"])
    return Manifest(
        product=_text(data["product"], "product", _NAME),
        version=_text(data["version"], "version", _VERSION),
        sequence=_int(data["sequence"], "sequence", 2**53),
        bundle_id=_text(data["bundle_id"], "bundle_id", _HEX64),
        created=_text(data["created"], "created", re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z")),
        expires=_text(data["expires"], "expires", re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")),
        signer=_text(data["signer"], "signer", _HEX64),
        target=target, files=tuple(files), split_files=tuple(split_files), models=models,
        lock=data["lock"], sbom=data["sbom"], key_rotation=rotation, differential=differential,
    )


def _differential(raw: Any, files: list[FileEntry], split_files: list[SplitFile]) -> Differential:
    entry = _keys(raw, _DIFFERENTIAL_KEYS, DIFFERENTIAL_KEY)
    held = tuple(check_path(p, f"{DIFFERENTIAL_KEY}.held") for p in _list(entry["held"], f"{DIFFERENTIAL_KEY}.held"))
    listed = {f.path for f in files}
    parts = {p for s in split_files for p in s.parts}
    if len(set(held)) != len(held) or list(held) != sorted(held):
        raise _fail(f"{DIFFERENTIAL_KEY}.held", "paths must be sorted and unique")
    for path in held:
        # A held file is one whole listed file (never a part: splitting is how a file ships) that
        # the installer may take from the installed release: a wheel or a model file.
        if path not in listed or path in parts or not _HOLDABLE.fullmatch(path):
            raise _fail(path, "held file is not a listed wheel or model file")
    return Differential(_text(entry["base_bundle_id"], f"{DIFFERENTIAL_KEY}.base_bundle_id", _HEX64),
                        _text(entry["base_version"], f"{DIFFERENTIAL_KEY}.base_version", _VERSION), held)


def _b64(value: Any, where: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > limit:
        raise _fail(where, "bad base64 field")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _fail(where, "bad base64 field") from exc


def _rotation_statement(raw: Any) -> dict[str, Any]:
    rotation = _keys(raw, _ROTATION_KEYS, "key_rotation")
    statement = _keys(_parse_statement(_b64(rotation["statement"], "key_rotation.statement", 1024)),
                      _STATEMENT_KEYS, "key_rotation.statement")
    if statement["format"] != ROTATION_FORMAT:
        raise _fail("key_rotation.statement", "unknown format")
    for name in ("old_fingerprint", "new_fingerprint"):
        _text(statement[name], f"key_rotation.{name}", _HEX64)
    _text(statement["product"], "key_rotation.product", _NAME)
    return statement


def _parse_statement(raw: bytes) -> Any:
    try:
        value = json.loads(raw.decode("ascii"), object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail("key_rotation.statement", "not ASCII JSON") from exc
    if canonical_json(value) != raw:
        raise _fail("key_rotation.statement", "not canonical JSON")
    return value


def _verify_rotation(raw: dict[str, Any], product: str, signer: str, trusted: frozenset[str] | set[str]) -> None:
    statement_bytes = _b64(raw["statement"], "key_rotation.statement", 1024)
    statement = _rotation_statement(raw)
    old_pem = raw["old_public_key"]
    if not isinstance(old_pem, str):
        raise _fail("key_rotation.old_public_key", "not a PEM string")
    old_key = load_public_key(old_pem.encode("ascii"), "key_rotation.old_public_key")
    old = fingerprint(old_key)
    if old not in trusted or statement["old_fingerprint"] != old:
        raise BundleError(f"{SIGNER_KEY_NAME}: signing key {signer} is not trusted, and its key-rotation "
                          f"statement is signed by {old[:16]}…, which is not trusted either",
                          hint="install with the fingerprint on the site's paper record")
    if not _verify_signature(old_key, statement_bytes, _b64(raw["signature"], "key_rotation.signature", 512)):
        raise BundleError(f"{MANIFEST_NAME}: key-rotation statement signature does not verify",
                          hint="the bundle is tampered with; do not install it")
    if statement["new_fingerprint"] != signer or statement["product"] != product:
        raise BundleError(f"{MANIFEST_NAME}: key-rotation statement is for another key or product",
                          hint="the bundle is tampered with; do not install it")


def rotation_record(old_private_key: ec.EllipticCurvePrivateKey, new_fingerprint: str, product: str) -> dict[str, str]:
    """The `key_rotation` manifest field: the old key vouches for the new one (build station side)."""
    old_public = old_private_key.public_key()
    statement = canonical_json({"format": ROTATION_FORMAT, "new_fingerprint": new_fingerprint,
                                "old_fingerprint": fingerprint(old_public), "product": product})
    signature = old_private_key.sign(statement, ec.ECDSA(hashes.SHA256()))
    pem = old_public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"old_public_key": pem.decode("ascii"), "signature": base64.b64encode(signature).decode("ascii"),
            "statement": base64.b64encode(statement).decode("ascii")}


# ---------------------------------------------------------------- the single I/O entry point


def read_root_file(directory: Path, name: str, limit: int) -> bytes:
    """Read a small file at the bundle root, refusing symlinks and anything over `limit` bytes."""
    import os
    import stat

    path = directory / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError as exc:
        raise BundleError(f"{name}: missing from {directory}", hint="point at the bundle's root directory") from exc
    except OSError as exc:
        raise BundleError(f"{name}: cannot be opened ({exc.strerror}); symlinks are refused",
                          hint="copy the bundle again from the build station") from exc
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise BundleError(f"{name}: not a regular file", hint="copy the bundle again")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{name}: over {limit} bytes", hint="the bundle is corrupt")
    return data


def verify_bundle(directory: Path, trusted: frozenset[str] | set[str], *, today: date | None = None,
                  check_whole_files: bool = True) -> Manifest:
    """Verify a bundle directory: signature and manifest first, then every file's size and SHA-256."""
    from bundler.verify import check_files

    directory = Path(directory)
    manifest = verify_manifest(read_root_file(directory, MANIFEST_NAME, MAX_MANIFEST_BYTES),
                               read_root_file(directory, SIGNATURE_NAME, MAX_SIGNATURE_BYTES),
                               read_root_file(directory, SIGNER_KEY_NAME, MAX_KEY_BYTES), trusted, today=today)
    check_files(directory, manifest, check_whole_files=check_whole_files)
    return manifest
