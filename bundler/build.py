"""`airlock-bundle build`: spec -> a signed bundle directory.

    airlock-bundle build bundler/examples/cpu-demo.toml --key keys/signing-key.pem --out /media/usb/bundle

Layout of the result:

    install.sh            the offline installer (listed in the manifest like every other file)
    MANIFEST.json         canonical JSON: product, version, sequence, target, every file's size + SHA-256
    MANIFEST.json.sig     DER ECDSA P-256 / SHA-256 signature over MANIFEST.json's exact bytes
    signer.pub.pem        the signer's public key (install.sh checks its fingerprint against --trust)
    sbom.cdx.json         CycloneDX SBOM of every wheel and model
    wheels/               the target's wheels and requirements.lock (name==version --hash=sha256:...)
    models/NAME/          config, tokenizer and safetensors files of each base model

The bundle is assembled in `OUT.partial` and renamed to OUT only once it is signed, so a failed
build never leaves something that looks like a bundle. Same spec + same inputs = the same
manifest bytes apart from `created` (files sorted, the project wheel built with a fixed epoch,
the SBOM timestamp-free, the bundle id a hash of the rest).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bundler.errors import BundleError
from bundler.manifest import (
    FORMAT,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    SIGNER_KEY_NAME,
    FileEntry,
    SplitFile,
    canonical_json,
    check_path,
    fingerprint,
    rotation_record,
)
from bundler.models import model_files
from bundler.sbom import ModelRecord, build_sbom
from bundler.signing import public_pem, sign
from bundler.spec import BundleSpec
from bundler.split import DEFAULT_SPLIT_BYTES, stage_file
from bundler.wheels import LOCK_NAME, download_wheels, highest_glibc, write_lock

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

INSTALLER_NAME = "install.sh"
SBOM_NAME = "sbom.cdx.json"
_CHECKOUT_INSTALLER = Path(__file__).resolve().parent.parent / INSTALLER_NAME


@dataclass(frozen=True)
class BuildResult:
    directory: Path
    manifest_bytes: bytes
    fingerprint: str
    files: int
    payload_bytes: int


def find_installer(spec: BundleSpec) -> Path:
    candidates = [spec.project.path / INSTALLER_NAME] if spec.project else []
    candidates.append(_CHECKOUT_INSTALLER)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise BundleError(f"{INSTALLER_NAME}: not found next to the project ({candidates[0]})",
                      hint="build from an airlock source checkout, or set project.path to one")


def build_bundle(spec: BundleSpec, key: ec.EllipticCurvePrivateKey, out: Path, *,
                 split_bytes: int = DEFAULT_SPLIT_BYTES, rotate_from: ec.EllipticCurvePrivateKey | None = None,
                 now: datetime | None = None) -> BuildResult:
    """Build and sign a bundle at `out` (which must not exist yet)."""
    if out.exists():
        raise BundleError(f"{out}: already exists", hint="bundles are never overwritten; choose a new --out")
    if split_bytes < 1:
        raise BundleError("split size must be at least one byte", hint="the default is 3.9 GiB (FAT32)")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest_bytes = _assemble(spec, key, staging, split_bytes, rotate_from, now or datetime.now(UTC))
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sum(1 for p in out.rglob("*") if p.is_file())
    payload = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return BuildResult(out, manifest_bytes, fingerprint(key.public_key()), files, payload)


def _assemble(spec: BundleSpec, key: ec.EllipticCurvePrivateKey, root: Path, split_bytes: int,
              rotate_from: ec.EllipticCurvePrivateKey | None, now: datetime) -> bytes:
    files: list[FileEntry] = []
    split_files: list[SplitFile] = []

    def add(entries: tuple[list[FileEntry], SplitFile | None]) -> None:
        files.extend(entries[0])
        if entries[1]:
            split_files.append(entries[1])

    add(stage_file(find_installer(spec), root, INSTALLER_NAME, split_bytes))
    (root / INSTALLER_NAME).chmod(0o755)

    wheels = download_wheels(spec, root / "wheels")
    for wheel in wheels:
        add(stage_file(root / "wheels" / wheel.filename, root, f"wheels/{wheel.filename}", split_bytes, move=True))
    write_lock(wheels, root / "wheels" / LOCK_NAME)
    add(stage_file(root / "wheels" / LOCK_NAME, root, f"wheels/{LOCK_NAME}", split_bytes, move=True))

    model_records, model_entries = [], []
    for model in spec.models:
        before = len(files)
        for source in model_files(model):
            add(stage_file(source, root, f"models/{model.name}/{source.name}", split_bytes))
        digests = {f.path: f.sha256 for f in files[before:]}
        digests.update({s.path: s.sha256 for s in split_files if s.path.startswith(f"models/{model.name}/")})
        shipped = sorted(p for p in digests if not _is_part(p, split_files))
        model_records.append(ModelRecord(model.name, tuple((p, digests[p]) for p in shipped)))
        model_entries.append({"name": model.name, "path": f"models/{model.name}"})

    (root / SBOM_NAME).write_bytes(build_sbom(spec.product, spec.version, wheels, model_records))
    add(stage_file(root / SBOM_NAME, root, SBOM_NAME, split_bytes, move=True))

    for entry in files:
        # Targets accept only this path alphabet (install.sh reads the manifest with sed): refuse here, not there.
        try:
            check_path(entry.path)
        except BundleError as exc:
            raise BundleError(f"{entry.path}: this file name cannot ship in a bundle",
                              hint="rename it to letters, digits and ._+- only (no spaces, no leading dot)") from exc
    glibc = max(highest_glibc(wheels), 5)
    body = {
        "expires": spec.expires.isoformat(),
        "files": [_file_dict(f) for f in sorted(files, key=lambda f: f.path)],
        "format": FORMAT,
        # A rotation statement carries a fresh (randomized) ECDSA signature: such bundles differ per build.
        "key_rotation": rotation_record(rotate_from, fingerprint(key.public_key()), spec.product)
        if rotate_from is not None else None,
        "lock": f"wheels/{LOCK_NAME}",
        "models": model_entries,
        "product": spec.product,
        "sbom": SBOM_NAME,
        "sequence": spec.sequence,
        "signer": fingerprint(key.public_key()),
        "split_files": [{"parts": list(s.parts), "path": s.path, "sha256": s.sha256, "size": s.size}
                        for s in sorted(split_files, key=lambda s: s.path)],
        "target": {"arch": spec.target.arch, "cuda_major": spec.target.cuda_major, "glibc_min": f"2.{glibc}",
                   "min_driver": spec.target.driver_needed, "platforms": spec.target.platform_tags(),
                   "python_version": spec.target.python},
        "version": spec.version,
    }
    body["bundle_id"] = hashlib.sha256(canonical_json(body)).hexdigest()
    body["created"] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest_bytes = canonical_json(body)
    (root / MANIFEST_NAME).write_bytes(manifest_bytes)
    (root / SIGNATURE_NAME).write_bytes(sign(key, manifest_bytes))
    (root / SIGNER_KEY_NAME).write_bytes(public_pem(key.public_key()))
    return manifest_bytes


def _file_dict(entry: FileEntry) -> dict[str, object]:
    return {"path": entry.path, "sha256": entry.sha256, "size": entry.size}


def _is_part(path: str, split_files: list[SplitFile]) -> bool:
    return any(path in s.parts for s in split_files)
