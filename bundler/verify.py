"""Check a bundle directory's files against a manifest that `bundler.manifest` already verified.

Fails closed on the first problem with one line naming the file: an entry on disk that is not a
regular file (symlink, fifo, device), a file the manifest does not list, a listed file that is
missing, a wrong size, a wrong SHA-256, or a split file whose parts do not reassemble to its
hash. Files are opened with O_NOFOLLOW and checked with fstat, so a symlink swapped in after the
directory walk is refused too.

A differential bundle's held files are not on the stick (one that is counts as an extra file);
`check_held_files` checks them where the installed release keeps them, with the same size and
SHA-256 rules, before anything of the bundle runs (ADR 0018).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from bundler.errors import BundleError

if TYPE_CHECKING:
    from bundler.manifest import FileEntry, Manifest

CHUNK = 4 * 2**20
_HINT = "the bundle is incomplete or tampered with: copy it again from the build station and re-verify"


def list_bundle_entries(directory: Path) -> dict[str, int]:
    """Every non-directory entry under `directory` (relative path -> st_mode), without following links."""
    entries: dict[str, int] = {}
    for root, dirs, files in os.walk(directory, followlinks=False):
        rel_root = Path(root).relative_to(directory)
        for name in [*dirs, *files]:
            full = Path(root) / name
            mode = os.lstat(full).st_mode
            if stat.S_ISDIR(mode):
                continue
            entries[(rel_root / name).as_posix()] = mode
    return entries


def check_files(directory: Path, manifest: Manifest, *, check_whole_files: bool = True) -> None:
    from bundler.manifest import UNLISTED

    directory = Path(directory)
    on_disk = list_bundle_entries(directory)
    listed = {f.path: f for f in manifest.files}
    held = {f.path for f in manifest.held_entries()}
    for path in sorted(held & set(on_disk)):
        raise BundleError(f"{path}: on the stick, but the manifest says the installed release holds it "
                          "(differential bundle)", hint=_HINT)
    for path, mode in sorted(on_disk.items()):
        if not stat.S_ISREG(mode):
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
            raise BundleError(f"{path}: is {kind}; bundles hold regular files only", hint=_HINT)
        if path not in listed and path not in UNLISTED:
            raise BundleError(f"{path}: not listed in the manifest (extra file)", hint=_HINT)
    shipped = [f for f in manifest.files if f.path not in held]
    for entry in shipped:
        if entry.path not in on_disk:
            raise BundleError(f"{entry.path}: listed in the manifest but missing", hint=_HINT)
    part_of = {part: split for split in manifest.split_files for part in split.parts}
    whole_hashers = {split.path: hashlib.sha256() for split in manifest.split_files} if check_whole_files else {}
    for entry in shipped:
        split = part_of.get(entry.path)
        digest = _hash_file(directory / entry.path, entry.path, entry.size,
                            whole_hashers.get(split.path) if split else None)
        if digest != entry.sha256:
            raise BundleError(f"{entry.path}: SHA-256 does not match the manifest", hint=_HINT)
    for split in manifest.split_files:
        total = sum(listed[p].size for p in split.parts)
        if total != split.size:
            raise BundleError(f"{split.path}: parts add up to {total} bytes, manifest says {split.size}", hint=_HINT)
        if check_whole_files and whole_hashers[split.path].hexdigest() != split.sha256:
            raise BundleError(f"{split.path}: reassembled parts do not match the manifest's SHA-256", hint=_HINT)


def check_held_files(manifest: Manifest, stores: Iterable[Path], *, base: str) -> list[tuple[FileEntry, Path]]:
    """Find each held file of a differential bundle by its SHA-256 in the installed release's content
    stores (`stores`, searched in order) and check its size and hash; returns (entry, location) pairs.

    `base` names the installed release in messages. A file that is absent, not a regular file, or
    whose bytes differ from the manifest stops everything with one line naming it.
    """
    stores = list(stores)
    found = []
    for entry in manifest.held_entries():
        location = _first_present(stores, entry.sha256)
        if location is None:
            raise BundleError(f"{entry.path}: the differential bundle needs it from the installed release {base}, "
                              f"which lacks it (SHA-256 {entry.sha256[:16]}… in {' or '.join(map(str, stores))})",
                              hint="install the full bundle of this release instead")
        digest = _hash_file(location, entry.path, entry.size, hint=_HELD_HINT)
        if digest != entry.sha256:
            raise BundleError(f"{entry.path}: the installed release's copy ({location}) does not match the "
                              "manifest's SHA-256 (tampered with or damaged)", hint=_HELD_HINT)
        found.append((entry, location))
    return found


_HELD_HINT = ("the installed release's content was changed after it was installed: tell your security office, then "
              "install the full bundle of this release")


def _first_present(stores: list[Path], name: str) -> Path | None:
    for store in stores:
        candidate = store / name
        if os.path.lexists(candidate):
            return candidate
    return None


def _hash_file(path: Path, name: str, expected_size: int, also: hashlib._Hash | None = None, *,
               hint: str = _HINT) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise BundleError(f"{name}: cannot be opened ({exc.strerror}); symlinks are refused", hint=hint) from exc
    with os.fdopen(fd, "rb", buffering=0) as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{name}: not a regular file", hint=hint)
        if info.st_size != expected_size:
            raise BundleError(f"{name}: size {info.st_size} bytes, manifest says {expected_size}", hint=hint)
        hasher = hashlib.sha256()
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            hasher.update(view[:count])
            if also is not None:
                also.update(view[:count])
    return hasher.hexdigest()
