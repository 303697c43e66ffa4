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

`--differential-from OLD` (an earlier bundle, or the directory holding its MANIFEST.json, .sig and
signer.pub.pem, such as an installed release's `bundle/`) makes a differential bundle: wheels and
model files whose SHA-256 the old bundle already had are not shipped; the manifest still lists
them, with their hashes, under `differential.held`, and the target takes them from the installed
base release (ADR 0018). install.sh, the lock and the SBOM always ship.

The bundle is assembled in `OUT.partial` and renamed to OUT only once it is signed, so a failed
build never leaves something that looks like a bundle. Same spec + same inputs = the same
manifest bytes apart from `created` (files sorted, the project wheel built with a fixed epoch,
the SBOM timestamp-free, the bundle id a hash of the rest).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bundler.errors import BundleError
from bundler.manifest import (
    DIFFERENTIAL_KEY,
    FORMAT,
    MANIFEST_NAME,
    MAX_KEY_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    MIN_CC_KEY,
    SIGNATURE_NAME,
    SIGNER_KEY_NAME,
    FileEntry,
    Manifest,
    SplitFile,
    canonical_json,
    check_path,
    fingerprint,
    load_public_key,
    read_root_file,
    rotation_record,
    verify_manifest,
)
from bundler.models import model_files
from bundler.sbom import ModelRecord, build_sbom
from bundler.signing import public_pem, sign
from bundler.spec import BundleSpec
from bundler.split import DEFAULT_SPLIT_BYTES, file_sha256, stage_file
from bundler.wheels import LOCK_NAME, collect_wheels, highest_glibc, write_lock

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
    held_files: int = 0
    """Files a differential bundle leaves to the installed base (0 for a full bundle)."""
    full_bytes: int = 0
    """Bytes of every listed file, shipped or held: the size of the equivalent full bundle's payload."""


def load_base_manifest(path: Path) -> Manifest:
    """The manifest a differential bundle is built against: a bundle directory, an installed release's
    `bundle/` directory, or the MANIFEST.json inside either. Its signature is checked against its own
    signer key (which file it is, is the builder's choice; what the target holds is checked there)."""
    directory = path.parent if path.name == MANIFEST_NAME else path
    if not directory.is_dir():
        raise BundleError(f"{path}: not a bundle directory or a MANIFEST.json",
                          hint="--differential-from takes the base bundle (or its MANIFEST.json beside its .sig "
                               "and signer.pub.pem)")
    key_pem = read_root_file(directory, SIGNER_KEY_NAME, MAX_KEY_BYTES)
    own = fingerprint(load_public_key(key_pem))
    return verify_manifest(read_root_file(directory, MANIFEST_NAME, MAX_MANIFEST_BYTES),
                           read_root_file(directory, SIGNATURE_NAME, MAX_SIGNATURE_BYTES), key_pem, {own},
                           today=date(1970, 1, 1))


def _base_hashes(spec: BundleSpec, base: Manifest) -> frozenset[str]:
    """SHA-256 of every whole file the base release installed (a split file counts whole, not its parts)."""
    if base.product != spec.product:
        raise BundleError(f"--differential-from: the base is product '{base.product}', the spec '{spec.product}'",
                          hint="build against a bundle of the same product")
    if base.sequence >= spec.sequence:
        raise BundleError(f"--differential-from: the base's sequence {base.sequence} is not lower than the spec's "
                          f"{spec.sequence}", hint="a differential bundle upgrades its base: raise the spec's sequence")
    parts = {p for s in base.split_files for p in s.parts}
    return frozenset([f.sha256 for f in base.files if f.path not in parts] + [s.sha256 for s in base.split_files])


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
                 now: datetime | None = None, differential_from: Manifest | None = None) -> BuildResult:
    """Build and sign a bundle at `out` (which must not exist yet); differential over `differential_from`."""
    if out.exists():
        raise BundleError(f"{out}: already exists", hint="bundles are never overwritten; choose a new --out")
    if split_bytes < 1:
        raise BundleError("split size must be at least one byte", hint="the default is 3.9 GiB (FAT32)")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    base_hashes = _base_hashes(spec, differential_from) if differential_from is not None else None
    staging.mkdir(parents=True)
    try:
        manifest_bytes = _assemble(spec, key, staging, split_bytes, rotate_from, now or datetime.now(UTC),
                                   differential_from, base_hashes)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    on_disk = [p for p in out.rglob("*") if p.is_file()]
    manifest = verify_manifest(manifest_bytes, (out / SIGNATURE_NAME).read_bytes(),
                               (out / SIGNER_KEY_NAME).read_bytes(), {fingerprint(key.public_key())},
                               today=date(1970, 1, 1))
    return BuildResult(out, manifest_bytes, fingerprint(key.public_key()), len(on_disk),
                       sum(p.stat().st_size for p in on_disk), len(manifest.held_entries()), manifest.full_bytes)


def _assemble(spec: BundleSpec, key: ec.EllipticCurvePrivateKey, root: Path, split_bytes: int,
              rotate_from: ec.EllipticCurvePrivateKey | None, now: datetime, base: Manifest | None,
              base_hashes: frozenset[str] | None) -> bytes:
    files: list[FileEntry] = []
    split_files: list[SplitFile] = []
    held: list[FileEntry] = []

    def add(entries: tuple[list[FileEntry], SplitFile | None]) -> None:
        files.extend(entries[0])
        if entries[1]:
            split_files.append(entries[1])

    add(stage_file(find_installer(spec), root, INSTALLER_NAME, split_bytes))
    (root / INSTALLER_NAME).chmod(0o755)

    # Model files are copied and hashed while pip resolves the wheels (its own process), and the
    # wheels join the same pool as soon as pip has chosen them.
    model_sources = [(model, model_files(model)) for model in spec.models]
    model_tasks = [(source, f"models/{model.name}/{source.name}", False) for model, sources in model_sources
                   for source in sources]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        futures = _submit(pool, model_tasks, root, split_bytes, base_hashes)
        with collect_wheels(spec, root / "wheels") as resolved:
            futures.update(_submit(pool, [(w.source, f"wheels/{w.filename}", w.downloaded) for w in resolved],
                                   root, split_bytes, base_hashes))
            placed = {rel: future.result() for rel, future in futures.items()}  # inside: the project wheel's dir
    wheels = []
    for wheel in resolved:
        entry = placed[f"wheels/{wheel.filename}"]
        wheels.append(wheel.placed(entry.sha256, entry.size))
    for rel, entry in placed.items():
        if isinstance(entry, _Held):
            held.append(FileEntry(rel, entry.size, entry.sha256))
        else:
            add((entry.entries, entry.split))
    write_lock(wheels, root / "wheels" / LOCK_NAME)
    add(stage_file(root / "wheels" / LOCK_NAME, root, f"wheels/{LOCK_NAME}", split_bytes, move=True))

    model_records, model_entries = [], []
    for model, sources in model_sources:
        shipped = sorted(f"models/{model.name}/{source.name}" for source in sources)
        model_records.append(ModelRecord(model.name, tuple((p, placed[p].sha256) for p in shipped)))
        model_entries.append({"name": model.name, "path": f"models/{model.name}"})

    (root / SBOM_NAME).write_bytes(build_sbom(spec.product, spec.version, wheels, model_records))
    add(stage_file(root / SBOM_NAME, root, SBOM_NAME, split_bytes, move=True))

    files.extend(held)
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
    if spec.target.min_compute_capability:
        body["target"][MIN_CC_KEY] = spec.target.min_compute_capability
    if base is not None:
        body[DIFFERENTIAL_KEY] = {"base_bundle_id": base.bundle_id, "base_version": base.version,
                                  "held": sorted(f.path for f in held)}
    body["bundle_id"] = hashlib.sha256(canonical_json(body)).hexdigest()
    body["created"] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest_bytes = canonical_json(body)
    (root / MANIFEST_NAME).write_bytes(manifest_bytes)
    (root / SIGNATURE_NAME).write_bytes(sign(key, manifest_bytes))
    (root / SIGNER_KEY_NAME).write_bytes(public_pem(key.public_key()))
    return manifest_bytes


@dataclass(frozen=True)
class _Shipped:
    entries: list[FileEntry]
    split: SplitFile | None

    @property
    def sha256(self) -> str:
        return self.split.sha256 if self.split else self.entries[0].sha256

    @property
    def size(self) -> int:
        return self.split.size if self.split else self.entries[0].size


@dataclass(frozen=True)
class _Held:
    """A file of a differential bundle that the installed base already has: listed, not shipped."""

    sha256: str
    size: int


def _submit(pool: ThreadPoolExecutor, tasks: list[tuple[Path, str, bool]], root: Path, split_bytes: int,
            base_hashes: frozenset[str] | None) -> dict[str, Future[_Shipped | _Held]]:
    """Copy and hash each (source, bundle path, already-in-the-bundle) file on the pool, biggest first.

    Each byte is read once (hashed while it is copied); hashlib and file I/O release the GIL on
    large buffers, so threads keep several cores busy. A differential build hashes first and
    copies only what the base lacks (a held file is read once and never written).
    """
    def place(source: Path, rel: str, move: bool) -> _Shipped | _Held:
        if base_hashes is not None:
            digest = file_sha256(source)
            if digest in base_hashes:
                size = source.stat().st_size
                if move:
                    source.unlink()
                return _Held(digest, size)
        return _Shipped(*stage_file(source, root, rel, split_bytes, move=move))

    ordered = sorted(tasks, key=lambda task: -task[0].stat().st_size)
    return {rel: pool.submit(place, source, rel, move) for source, rel, move in ordered}


def _file_dict(entry: FileEntry) -> dict[str, object]:
    return {"path": entry.path, "sha256": entry.sha256, "size": entry.size}


