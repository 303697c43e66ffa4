"""Listing an import path: stable order, symlink loops, dangling links, unreadable files, OS litter."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from appliance.data.walk import SYMLINK_REASON, InputFile, walk_inputs

as_root = os.geteuid() == 0


def listing(root: Path) -> dict[str, str]:
    return {f.rel: f.skip_reason for f in walk_inputs(root)}


def touch(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_files_are_listed_in_a_stable_order_with_relative_slash_paths(tmp_path: Path):
    for rel in ("b/2.txt", "a.jsonl", "b/1.txt", "b/c/3.csv", "B.txt"):
        touch(tmp_path / rel, b"12345")
    files = list(walk_inputs(tmp_path))
    assert [f.rel for f in files] == ["B.txt", "a.jsonl", "b/1.txt", "b/2.txt", "b/c/3.csv"]
    assert all(f.size == 5 and not f.skip_reason and f.path.is_file() for f in files)


def test_a_single_file_root_is_listed_by_its_name(tmp_path: Path):
    path = touch(tmp_path / "one.jsonl")
    assert list(walk_inputs(path)) == [InputFile(path, "one.jsonl", 1)]


def test_a_single_file_root_that_is_a_link_is_not_followed(tmp_path: Path):
    secret = touch(tmp_path / "outside" / "tls.key", b"SECRET")
    os.symlink(secret, tmp_path / "x.txt")
    [entry] = walk_inputs(tmp_path / "x.txt")
    assert (entry.rel, entry.size, entry.skip_reason) == ("x.txt", 0, SYMLINK_REASON)


def test_a_missing_root_is_one_entry_with_a_reason(tmp_path: Path):
    [entry] = walk_inputs(tmp_path / "nope")
    assert entry.skip_reason == "cannot open the import path (no such file or directory)"


def test_symlink_loops_are_reported_once_and_never_followed(tmp_path: Path):
    touch(tmp_path / "d" / "f.txt")
    os.symlink("..", tmp_path / "d" / "up")          # back to the root
    os.symlink(".", tmp_path / "d" / "self")         # back to its own folder
    os.symlink("loop", tmp_path / "loop")            # a link to itself
    entries = listing(tmp_path)
    assert entries["d/f.txt"] == ""
    assert entries["d/up"] == entries["d/self"] == entries["loop"] == SYMLINK_REASON
    assert len(entries) == 4


def test_dangling_symlinks_are_reported(tmp_path: Path):
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "link.jsonl")
    assert listing(tmp_path) == {"link.jsonl": SYMLINK_REASON}


@pytest.mark.parametrize("link_name", ["a_link", "z_link"])  # before and after the real folder
def test_a_folder_linked_inside_the_root_is_read_once_through_its_real_path(tmp_path: Path, link_name: str):
    touch(tmp_path / "m_real" / "x.txt")
    os.symlink("m_real", tmp_path / link_name)
    entries = listing(tmp_path)
    assert entries == {"m_real/x.txt": "", link_name: SYMLINK_REASON}


def test_symlinks_out_of_the_root_are_reported_never_followed(tmp_path: Path):
    """Attack: a stick carries `x.txt -> a file outside the import root` (a TLS key, say)."""
    touch(tmp_path / "outside" / "data.jsonl", b"abc")
    touch(tmp_path / "outside" / "dir" / "key.pem", b"abc")
    (tmp_path / "in").mkdir()
    os.symlink(tmp_path / "outside" / "data.jsonl", tmp_path / "in" / "linked.jsonl")
    os.symlink(tmp_path / "outside" / "dir", tmp_path / "in" / "linked_dir")
    assert listing(tmp_path / "in") == {"linked.jsonl": SYMLINK_REASON, "linked_dir": SYMLINK_REASON}


def test_os_litter_is_listed_as_metadata_so_that_counts_add_up(tmp_path: Path):
    for rel in (".DS_Store", "._notes.txt", "Thumbs.db", "sub/desktop.ini", "__MACOSX/z/._a.txt",
                "__MACOSX/a/._b.txt", "notes.txt"):
        touch(tmp_path / rel)
    entries = listing(tmp_path)
    assert entries.pop("notes.txt") == ""
    assert list(entries) == [".DS_Store", "._notes.txt", "Thumbs.db", "__MACOSX/a/._b.txt", "__MACOSX/z/._a.txt",
                             "sub/desktop.ini"]
    assert set(entries.values()) == {"operating-system metadata, not data"}


def test_pipes_sockets_and_devices_are_reported_by_kind_and_never_opened(tmp_path: Path):
    import socket

    os.mkfifo(tmp_path / "pipe.jsonl")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "sock.txt"))
    expected = {"pipe.jsonl": "not a regular file (a named pipe): never opened",
                "sock.txt": "not a regular file (a socket): never opened"}
    if as_root:  # only root may create device nodes; /dev/zero's numbers (1, 5) are fixed on Linux
        os.mknod(tmp_path / "zero.txt", 0o600 | __import__("stat").S_IFCHR, os.makedev(1, 5))
        expected["zero.txt"] = "not a regular file (a character device): never opened"
    try:
        assert listing(tmp_path) == expected
    finally:
        server.close()


def _unreadable_tree(base: Path) -> Path:
    root = base / "stick"
    touch(root / "ok.jsonl").chmod(0o644)
    touch(root / "secret.jsonl").chmod(0)
    touch(root / "closed" / "inside.jsonl")
    (root / "closed").chmod(0)
    return root


def _check_unreadable(entries: dict[str, str]) -> None:
    assert entries == {"closed": "cannot list this folder (permission denied)",
                       "ok.jsonl": "",
                       "secret.jsonl": "cannot read (permission denied); check the file's permissions"}


@pytest.mark.skipif(as_root, reason="root reads files whatever their mode (see the unprivileged variant)")
def test_unreadable_files_and_folders_are_reported(tmp_path: Path):
    root = _unreadable_tree(tmp_path)
    try:
        _check_unreadable(listing(root))
    finally:
        (root / "closed").chmod(0o755)


@pytest.mark.skipif(not as_root, reason="the test above runs as this user")
def test_unreadable_files_and_folders_are_reported_to_an_unprivileged_user():
    # As root, walk in a forked child that has dropped to nobody (no new interpreter is started:
    # the interpreter's own files may be unreadable to nobody). walk.py imports nothing lazily.
    base = Path(tempfile.mkdtemp(prefix="airlock-walk-"))
    try:
        base.chmod(0o755)
        root = _unreadable_tree(base)
        root.chmod(0o755)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, and never return into pytest
            try:
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    message = json.dumps(listing(root))
                except BaseException as exc:
                    message = json.dumps({"child error": repr(exc)})
                os.write(write_end, message.encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            entries = json.loads(pipe.read())
        os.waitpid(pid, 0)
        if "child error" in entries and "Operation not permitted" in entries["child error"]:
            pytest.skip("cannot drop privileges here")
        _check_unreadable(entries)
    finally:
        (base / "stick" / "closed").chmod(0o755)
        shutil.rmtree(base)
