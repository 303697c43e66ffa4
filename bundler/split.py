"""Place a file into the bundle, hashing it on the way, split into parts above a threshold.

FAT32 (still the default on many USB sticks) cannot hold a file of 4 GiB or more, so files over
`DEFAULT_SPLIT_BYTES` (3.9 GiB) ship as `NAME.part000`, `NAME.part001`, ...; the manifest lists
every part and the whole file's size and SHA-256, and the installer reassembles and re-checks.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from bundler.manifest import FileEntry, SplitFile

DEFAULT_SPLIT_BYTES = int(3.9 * 2**30)
CHUNK = 4 * 2**20


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def part_name(rel_path: str, index: int) -> str:
    return f"{rel_path}.part{index:03d}"


def stage_file(src: Path, root: Path, rel_path: str, split_bytes: int = DEFAULT_SPLIT_BYTES,
               *, move: bool = False) -> tuple[list[FileEntry], SplitFile | None]:
    """Copy `src` to `root/rel_path` (or its parts) and return the manifest entries.

    `move=True` is for files already inside the bundle (pip's downloads): small ones stay where
    they are and are only hashed; large ones are split and the original is removed.
    """
    size = src.stat().st_size
    dest = root / rel_path
    dest.parent.mkdir(parents=True, exist_ok=True)
    if size <= split_bytes:
        hasher = hashlib.sha256()
        if move and src.resolve() == dest.resolve():
            with src.open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    hasher.update(chunk)
        else:
            with src.open("rb") as reader, dest.open("xb") as writer:
                while chunk := reader.read(CHUNK):
                    hasher.update(chunk)
                    writer.write(chunk)
        return [FileEntry(rel_path, size, hasher.hexdigest())], None
    whole = hashlib.sha256()
    entries: list[FileEntry] = []
    with src.open("rb") as reader:
        index = 0
        while True:
            part_path = part_name(rel_path, index)
            part_hasher, written = hashlib.sha256(), 0
            with (root / part_path).open("xb") as writer:
                while written < split_bytes:
                    chunk = reader.read(min(CHUNK, split_bytes - written))
                    if not chunk:
                        break
                    whole.update(chunk)
                    part_hasher.update(chunk)
                    writer.write(chunk)
                    written += len(chunk)
            entries.append(FileEntry(part_path, written, part_hasher.hexdigest()))
            index += 1
            if sum(e.size for e in entries) >= size:
                break
    if move:
        os.unlink(src)
    return entries, SplitFile(rel_path, size, whole.hexdigest(), tuple(e.path for e in entries))
