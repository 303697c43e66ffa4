"""List the files under an import path, in a stable order, without ever raising on a bad entry.

USB sticks bring symlinks (to anywhere: `x.txt -> /etc/ssl/private/tls.key`), devices, pipes,
unreadable files and operating-system litter. Links and special files are reported, never
followed or opened.
Every entry becomes an `InputFile`; problems become `skip_reason` so that the report can put
the file in the "rejected" bucket with one clear line instead of aborting the import.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Litter that file managers leave on sticks; reported (so counts add up), never parsed.
_SYSTEM_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", "._.DS_Store"}
_SYSTEM_DIRS = {"__MACOSX", ".Trashes", ".Spotlight-V100", ".fseventsd", "System Volume Information"}


@dataclass(frozen=True)
class InputFile:
    """One file found under the import root. `rel` uses '/' and is relative to the root."""

    path: Path
    rel: str
    size: int
    skip_reason: str = ""


def walk_inputs(root: Path) -> Iterator[InputFile]:
    """Yield every file under `root` (or `root` itself if it is a file), sorted by relative path.

    Nothing leads out of the root: a symbolic link (to a file or a folder, inside the root or out
    of it) is reported and never followed, so a link `x.txt -> /etc/ssl/private/tls.key` on a stick
    imports nothing. Devices, pipes and sockets are reported by kind and never opened. A root
    folder is what the operator chose and may be a link (`/media/usb`); a root file may not.
    """
    root = Path(root)
    try:
        st = root.stat()
    except OSError as exc:
        yield InputFile(root, root.name, 0, f"cannot open the import path ({_os_reason(exc)})")
        return
    if not stat.S_ISDIR(st.st_mode):
        # A single file is read only if it is the file itself, not a link to one (the inbox of a
        # scheduled retrain hands files one by one; a link swapped in there is not followed either).
        yield _classify(root, root.name, follow=False)
        return
    yield from _walk_dir(root, "", {(st.st_dev, st.st_ino)})


def _walk_dir(directory: Path, prefix: str, visited: set[tuple[int, int]]) -> Iterator[InputFile]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        yield InputFile(directory, prefix.rstrip("/") or ".", 0, f"cannot list this folder ({_os_reason(exc)})")
        return
    for entry in entries:
        rel = prefix + entry.name
        path = Path(entry.path)
        if entry.is_symlink():
            yield InputFile(path, rel, 0, SYMLINK_REASON)
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        if is_dir:
            if entry.name in _SYSTEM_DIRS:
                yield from _litter(path, rel + "/")
                continue
            try:
                dst = entry.stat(follow_symlinks=False)
            except OSError:
                dst = None
            if dst is not None:
                key = (dst.st_dev, dst.st_ino)
                # A bind mount can bring the same folder in twice: reading it again would count
                # every file in it twice.
                if key in visited:
                    yield InputFile(path, rel, 0, "the same folder was already read through a mount")
                    continue
                visited.add(key)
            yield from _walk_dir(path, rel + "/", visited)
            continue
        yield _classify(path, rel, follow=False)


SYMLINK_REASON = ("symbolic link, not followed (an import reads only regular files inside the import folder; "
                  "copy the file itself there)")


def _litter(directory: Path, prefix: str) -> Iterator[InputFile]:
    for dirpath, dirs, files in os.walk(directory):
        dirs.sort()  # os.walk lists in directory order; the report's order must not depend on it
        for name in sorted(files):
            rel = prefix + os.path.relpath(os.path.join(dirpath, name), directory).replace(os.sep, "/")
            yield InputFile(Path(dirpath, name), rel, 0, "operating-system metadata, not data")


def _classify(path: Path, rel: str, *, follow: bool) -> InputFile:
    try:
        st = path.stat() if follow else path.lstat()
    except OSError as exc:
        return InputFile(path, rel, 0, f"cannot read ({_os_reason(exc)})")
    if stat.S_ISLNK(st.st_mode):  # replaced by a link since the folder was listed
        return InputFile(path, rel, 0, SYMLINK_REASON)
    if not stat.S_ISREG(st.st_mode):
        return InputFile(path, rel, 0, f"not a regular file ({_special_kind(st.st_mode)}): never opened")
    if path.name in _SYSTEM_NAMES or path.name.startswith("._"):
        return InputFile(path, rel, st.st_size, "operating-system metadata, not data")
    if not os.access(path, os.R_OK):
        return InputFile(path, rel, st.st_size, "cannot read (permission denied); check the file's permissions")
    return InputFile(path, rel, st.st_size)


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "a special file"


def _os_reason(exc: OSError) -> str:
    # strerror only: str(exc) repeats the absolute path, which may hold a patient's name.
    return (exc.strerror or type(exc).__name__).lower()
