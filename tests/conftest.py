"""Shared fixtures: every test gets its own AIRLOCK_HOME; CLIs run as real subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def airlock_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "airlock-home"
    monkeypatch.setenv("AIRLOCK_HOME", str(home))
    monkeypatch.delenv("AIRLOCK_MODELS", raising=False)
    return home


def run_cli(*args: str, prog: str = "airlock", env: dict[str, str] | None = None, wrap: list[str] | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run an installed console script (optionally under a wrapper such as `unshare -n`)."""
    command = [*(wrap or []), str(BIN / prog), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})}, cwd=REPO)


# Run in a child process by the helpers below: whoever reads a file that SQLite has open in *this* process and closes it
# drops that connection's POSIX locks (they belong to the process, not the descriptor); a CLI's WAL checkpoint then
# changes the catalog under the connection ("locking protocol", "database disk image is malformed").
_SEARCH = r"""
import json, os, stat, sys
request = json.loads(sys.stdin.read())
needles = [bytes.fromhex(n) for n in request["needles"]]
hits = []
for root in request["roots"]:
    for folder, _dirs, names in os.walk(root):  # skips folders that vanish meanwhile (parallel runs in /tmp)
        for name in names:
            path = os.path.join(folder, name)
            try:
                info = os.lstat(path)
                if not stat.S_ISREG(info.st_mode) or info.st_mtime < request["since"]:
                    continue
                with open(path, "rb") as handle:
                    raw = handle.read()
            except OSError:
                continue
            hits += [[path, needle.hex()] for needle in needles if needle in raw]
print(json.dumps(hits))
"""


def files_holding(roots: Path | list[Path], *needles: bytes, since: float = 0.0) -> list[tuple[str, bytes]]:
    """(path, needle) for every regular file under `roots` (modified at or after `since`) that holds a needle.

    Searched in a child process, so that the test's own catalog connections keep their locks (see _SEARCH)."""
    import json

    request = {"roots": [str(r) for r in (roots if isinstance(roots, list) else [roots])],
               "needles": [n.hex() for n in needles], "since": since}
    done = subprocess.run([sys.executable, "-I", "-c", _SEARCH], input=json.dumps(request), capture_output=True,
                          text=True, timeout=300, check=True)
    return [(path, bytes.fromhex(needle)) for path, needle in json.loads(done.stdout)]


def catalog_bytes(home: Path) -> bytes:
    """The bytes of catalog.db and its WAL/SHM files, read in a child process (see _SEARCH)."""
    script = ("import pathlib, sys; home = pathlib.Path(sys.argv[1]); "
              "sys.stdout.buffer.write(b''.join(p.read_bytes() for p in sorted(home.glob('catalog.db*'))))")
    return subprocess.run([sys.executable, "-I", "-c", script, str(home)], capture_output=True, timeout=120,
                          check=True).stdout


def unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode == 0


def loopback_up() -> bool:
    """False inside `unshare -n`, where even 127.0.0.1 is down."""
    from appliance.demo.netns import loopback_works

    return loopback_works()


needs_loopback = pytest.mark.skipif(not loopback_up(), reason="the loopback interface is down here "
                                                               "(e.g. inside `unshare -n`)")

needs_unshare = pytest.mark.skipif(not unshare_available(),
                                   reason="`unshare -n` is not permitted here (needs root or user namespaces)")


FIXED_SITE_SECRET = bytes(range(32))
"""The site secret of test vaults whose outcome depends on a split (see `fix_site_secret`)."""


def fix_site_secret(home: Path | None = None, secret: bytes = FIXED_SITE_SECRET, keys=None) -> None:
    """Store a known site secret in an unlocked vault before its first import.

    The site secret keys the patient pseudonyms and each dataset's split seed, so with it fixed a
    dataset's train/val/test assignment, and every metric or gate that depends on it, is the same on
    every run. It goes through the real vault (object, DEK, encrypted file), as the first import
    would store a random one. Call it after `vault unlock` and before `data import`; `keys` (e.g. a
    LocalKeys) instead of the key agent's.
    """
    from appliance.catalog import open_catalog
    from appliance.data.site_secret import FILE_NAME, OBJECT_ID, site_secret
    from appliance.vault.lifecycle import keys_for
    from appliance.vault.store import create_object, file_path, write_bytes

    home = Path(home or os.environ["AIRLOCK_HOME"])
    db = open_catalog(home)
    try:
        keys = keys or keys_for(db, home)
        if not file_path(home, OBJECT_ID, FILE_NAME).exists():
            create_object(db, keys, OBJECT_ID, "secret")
            write_bytes(db, keys, home, OBJECT_ID, FILE_NAME, secret)
        assert site_secret(db, keys, home) == secret, "the vault already had another site secret (import ran first?)"
    finally:
        db.close()


# Tests that share a session fixture run on one pytest-xdist worker, so that the fixture is built
# once (`make test` runs `-n 2 --dist loadgroup`): each of these folders builds a served appliance or
# a set of exports once per session. Elsewhere a module is the unit (its module fixtures are built once).
SESSION_GROUPS = ("tests/appliance/serve", "tests/appliance/optimize")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        path = Path(str(item.path)).relative_to(REPO).as_posix()
        group = next((folder for folder in SESSION_GROUPS if path.startswith(folder + "/")), path)
        item.add_marker(pytest.mark.xdist_group(group))
