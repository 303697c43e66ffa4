"""A new release's byte-code: the previous release's compiled files where a source is unchanged, the rest compiled.

    python -I -m appliance.bytecode [--previous /opt/airlock/releases/0.1.0/venv]

install.sh runs this with the new release's own interpreter (its venv, just installed from the verified
bundle) after `pip install --no-compile`. pip compiles every file of every wheel on one core: about 60 of the
75 CPU-seconds of installing the CPU stack, minutes for a CUDA bundle, and the same again on every upgrade
although most distributions did not change. Here (ADR 0021):

1. With `--previous` (an upgrade), each `.py` of the new site-packages whose bytes equal the previous
   release's file at the same path takes that file's `__pycache__/*.cpython-XY.pyc`, when the old pyc is
   valid for the old source (this interpreter's magic number, timestamp-based, the source's mtime and size
   in its header) and every file and directory involved is a regular file or directory owned by the
   installing user, writable by it alone (no symlink, nothing the service account or anyone else could have
   written). The new source gets the old source's mtime, so the copied header is valid for it as it is: no
   byte of a pyc is written by us.
2. `compileall` compiles whatever is left, on every core. Files already valid are skipped.

Trust: a reused pyc is code from the previous release, not from the signed bundle. That release is the one
running the upgrade (`airlock upgrade` verifies the bundle with it) and is root's, so it is trusted already;
a fresh prefix gets none of it.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import os
import stat
import struct
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HEADER = struct.Struct("<4sIII")  # PEP 552: magic, flags (0: timestamp-based), source mtime, source size


@dataclass
class BytecodeReport:
    sources: int = 0  # .py files in the new site-packages
    reused: int = 0  # of them, given the previous release's pyc


def _private(st: os.stat_result, uid: int, kind: int) -> bool:
    """A file or directory of `kind` (stat.S_IFREG / S_IFDIR) that only `uid` can have written."""
    return (stat.S_IFMT(st.st_mode) == kind and st.st_uid == uid
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _valid_for(pyc: bytes, source: os.stat_result) -> bool:
    """What the import system checks before it runs a timestamp-based pyc (importlib's _validate_timestamp_pyc)."""
    if len(pyc) < HEADER.size:
        return False
    magic, flags, mtime, size = HEADER.unpack_from(pyc)
    return (magic == importlib.util.MAGIC_NUMBER and flags == 0
            and mtime == int(source.st_mtime) & 0xFFFFFFFF and size == source.st_size & 0xFFFFFFFF)


def reuse_previous_bytecode(previous_site: Path, site: Path, report: BytecodeReport) -> None:
    """Step 1 for one site-packages folder: copy the previous release's pyc of every unchanged source."""
    uid = os.geteuid()
    try:
        if not _private(os.lstat(previous_site), uid, stat.S_IFDIR):
            return
    except OSError:
        return
    for folder, dirs, files in os.walk(site):  # symlinked folders are not entered (followlinks=False)
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        sources = [name for name in files if name.endswith(".py")]
        report.sources += len(sources)
        old_folder = previous_site / Path(folder).relative_to(site)
        try:  # the old folder and its __pycache__, once for all of the folder's files
            if not (_private(os.lstat(old_folder), uid, stat.S_IFDIR)
                    and _private(os.lstat(old_folder / "__pycache__"), uid, stat.S_IFDIR)):
                continue
        except OSError:
            continue  # no such folder in the previous release: all of it is compiled below
        for name in sources:
            new_source = Path(folder) / name
            old_source = old_folder / name
            old_pyc = Path(importlib.util.cache_from_source(str(old_source)))
            try:
                new_st, old_st = os.lstat(new_source), os.lstat(old_source)
                if not (stat.S_ISREG(new_st.st_mode) and _private(old_st, uid, stat.S_IFREG)
                        and new_st.st_size == old_st.st_size):
                    continue
                with open(old_pyc, "rb", opener=lambda path, flags: os.open(path, flags | os.O_NOFOLLOW)) as handle:
                    if not _private(os.fstat(handle.fileno()), uid, stat.S_IFREG):
                        continue
                    code = handle.read()
                if not _valid_for(code, old_st) or not filecmp.cmp(new_source, old_source, shallow=False):
                    continue
            except OSError:
                continue  # absent on one side, unreadable: compiled below like any other file
            target = Path(importlib.util.cache_from_source(str(new_source)))
            target.parent.mkdir(mode=0o755, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            partial.write_bytes(code)
            os.replace(partial, target)
            os.utime(new_source, ns=(new_st.st_atime_ns, old_st.st_mtime_ns))
            report.reused += 1


def site_folders(prefix: str = sys.prefix) -> list[Path]:
    """This interpreter's site-packages folders (purelib, and platlib where it is another folder)."""
    paths = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix})
    folders = [Path(paths["purelib"])]
    if Path(paths["platlib"]).resolve() != folders[0].resolve():
        folders.append(Path(paths["platlib"]))
    return folders


def prepare_bytecode(previous_venv: Path | None = None) -> BytecodeReport:
    """Steps 1 and 2 for the running venv; `previous_venv`: the current release's venv on an upgrade."""
    import compileall

    report = BytecodeReport()
    for site in site_folders():
        if previous_venv is not None:
            reuse_previous_bytecode(previous_venv / site.relative_to(sys.prefix), site, report)
        # As with pip's own compile, a file that does not compile for this interpreter (torch ships one
        # written for Python 3.12) stays without a pyc: importing it fails the same way with or without one.
        compileall.compile_dir(site, quiet=2, workers=0)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.bytecode", description=__doc__.splitlines()[0])
    parser.add_argument("--previous", type=Path, help="the venv of the release being upgraded from")
    args = parser.parse_args(argv)
    if sys.prefix == sys.base_prefix:
        print("appliance.bytecode: not in a venv; run it with the release's venv/bin/python", file=sys.stderr)
        return 2
    try:
        report = prepare_bytecode(args.previous)
    except OSError as exc:  # a full disk, a folder it may not write: one line, and install.sh stops
        print(f"appliance.bytecode: {exc}; check the free space and permissions under {sys.prefix}", file=sys.stderr)
        return 1
    if args.previous is None:
        print("byte-code: compiled on every core (no previous release to take it from)")
    else:
        print(f"byte-code: {report.reused} of {report.sources} modules taken from the previous release, "
              f"the rest compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
