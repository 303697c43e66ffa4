"""Signing keys for bundles: ECDSA P-256, private key as passphrase-encrypted PKCS#8 PEM.

Why P-256 and not Ed25519: a first install verifies with the target's own `openssl dgst -sha256
-verify`, which handles ECDSA P-256 on OpenSSL 1.1.1 and 3.x alike, while Ed25519 needs
`pkeyutl -rawin` (OpenSSL 3 only). See docs/adr/0004-bundle-trust.md.

The passphrase comes from `AIRLOCK_SIGNING_PASSPHRASE` when set (CI, tests), else a prompt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bundler.errors import BundleError
from bundler.manifest import fingerprint

PRIVATE_KEY_NAME = "signing-key.pem"
PUBLIC_KEY_NAME = "signing-key.pub.pem"
PASSPHRASE_ENV = "AIRLOCK_SIGNING_PASSPHRASE"  # noqa: S105 (the variable name, not a secret)
MIN_PASSPHRASE = 12


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    fingerprint: str


def public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_key(out_dir: Path, passphrase: bytes) -> KeyPair:
    """Write a new key pair into `out_dir` (private key 0600, refusing to overwrite)."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise BundleError(f"signing key passphrase is shorter than {MIN_PASSPHRASE} characters",
                          hint="choose a longer passphrase and keep it apart from the key file")
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / PRIVATE_KEY_NAME, out_dir / PUBLIC_KEY_NAME
    for path in (private_path, public_path):
        if path.exists():
            raise BundleError(f"{path}: already exists", hint="keygen never overwrites a key; pick another --out")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(passphrase))
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path.write_bytes(public_pem(key.public_key()))
    return KeyPair(private_path, public_path, fingerprint(key.public_key()))


def load_private_key(path: Path, passphrase: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the signing key ({exc.strerror})",
                          hint="pass the private key file that `airlock-bundle keygen` wrote") from exc
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path}: wrong passphrase or not an encrypted PEM private key",
                          hint=f"check the passphrase ({PASSPHRASE_ENV} or the prompt)") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise BundleError(f"{path}: not an ECDSA P-256 private key", hint="create one with `airlock-bundle keygen`")
    return key


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """DER-encoded ECDSA-SHA256 signature: the format `openssl dgst -sha256 -verify` reads."""
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def read_passphrase(confirm: bool = False) -> bytes:
    from_env = os.environ.get(PASSPHRASE_ENV)
    if from_env is not None:
        return from_env.encode()
    import click

    return click.prompt("signing key passphrase", hide_input=True, confirmation_prompt=confirm).encode()
