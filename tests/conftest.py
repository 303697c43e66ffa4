"""Shared fixtures: every test gets its own AIRLOCK_HOME; CLIs run as real subprocesses."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _share_the_cores() -> None:
    """Under pytest-xdist, every worker and every process its tests start (jobs, servers, torchrun ranks: they
    inherit the environment) use cores / workers OpenMP threads, unless OMP_NUM_THREADS is set already.
    Left at torch's default (one thread per core in every process), two workers and their jobs oversubscribe
    two cores and OpenMP's spinning threads burn what the others need: measured on this project's 2-core
    machine, `pytest -n 2 tests/appliance/registry` took 157 s (109 s user CPU) with the default and 99 s
    (43 s user) with one thread each. Set before torch is imported: OpenMP reads it when it loads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))


_share_the_cores()


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
skip = set(request["skip"])
hits = []
for root in request["roots"]:
    for folder, dirs, names in os.walk(root):  # skips folders that vanish meanwhile (parallel runs in /tmp)
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
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


def files_holding(roots: Path | list[Path], *needles: bytes, since: float = 0.0,
                  skip: list[Path] | tuple[Path, ...] = ()) -> list[tuple[str, bytes]]:
    """(path, needle) for every regular file under `roots` (modified at or after `since`) that holds a needle;
    the folders in `skip` are not entered.

    Searched in a child process, so that the test's own catalog connections keep their locks (see _SEARCH)."""
    import json

    request = {"roots": [str(r) for r in (roots if isinstance(roots, list) else [roots])],
               "needles": [n.hex() for n in needles], "since": since, "skip": [str(p) for p in skip]}
    done = subprocess.run([sys.executable, "-I", "-c", _SEARCH], input=json.dumps(request), capture_output=True,
                          text=True, timeout=300, check=True)
    return [(path, bytes.fromhex(needle)) for path, needle in json.loads(done.stdout)]


def all_pytest_folders(tmp_path: Path) -> Path:
    """The `pytest-of-<user>` folder: every run's and every worker's tmp_path, this test's among them.

    A search of the whole temp dir for stray plaintext skips it (it holds the inputs, this test's markers among them,
    and other tests' files, which nothing under test knows) and searches the test's own folders by themselves."""
    return next(parent for parent in tmp_path.parents if parent.name.startswith("pytest-of-"))


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

SERVICE_USER = "airlock-test"
"""The system account the installer tests and the sandbox test run the services as (created once, then reused)."""


@contextlib.contextmanager
def service_account_lock():
    """Held around every account creation or removal of the tests: `ensure_service_user`, and the install.sh
    run that creates (and the test then removes) an account of its own. Parallel test workers would otherwise
    race: one `useradd` fails ("cannot lock /etc/passwd", or the account already exists) and prints to the
    installer's stderr. The full installs create nothing (the account exists before they start), so they never
    wait for this lock while another install runs."""
    import fcntl

    with open(Path(tempfile.gettempdir()) / "airlock-test-account.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_service_user() -> pwd.struct_passwd:
    """The test service account, created with install.sh's options when absent."""
    with service_account_lock():
        try:
            return pwd.getpwnam(SERVICE_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                            "--shell", "/usr/sbin/nologin", "--comment", "Airlock appliance services", SERVICE_USER],
                           check=True)
            return pwd.getpwnam(SERVICE_USER)


needs_unshare = pytest.mark.skipif(not unshare_available(),
                                   reason="`unshare -n` is not permitted here (needs root or user namespaces)")


_REMOVALS: list[subprocess.Popen] = []


def remove_in_background(path: Path) -> None:
    """Delete a large tree (an installed release: 3 GB, 80,000 files) without holding up the worker. On this
    project's machines / is ext4 mounted with `discard`, so deleting just-written files waits on the disk:
    measured, `shutil.rmtree` of the e2e install's site took 56 s of wall time for 1.9 s of CPU, and up to 237 s
    as a test teardown while other tests wrote. The worker goes on; the session's end waits for the removals."""
    _REMOVALS.append(subprocess.Popen(["rm", "-rf", "--one-file-system", str(path)], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for removal in _REMOVALS:
        removal.wait()


@pytest.fixture(scope="session")
def release_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The releases of tests/bundler/bundles.py's `release_bundles`, built once for the install tests (the e2e
    install and the differential tests are one xdist unit, `SHARED_UNITS`, so one worker builds them)."""
    from tests.bundler.bundles import release_bundles as build

    return build(tmp_path_factory.mktemp("release-bundles"))


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


# Parallel runs (`make test`: `pytest -n CORES+1 --dist loadgroup --no-loadscope-reorder`, pytest-xdist).
# Tests that share a session fixture run on one worker, so that the fixture is built once: each of these
# folders builds a served appliance or a set of exports once per session. Elsewhere a module is the unit
# (its module fixtures are built once per worker that runs it).
SESSION_GROUPS = ("tests/appliance/serve", "tests/appliance/optimize")
# Modules that share a session fixture outside those folders: one unit, named by one of its modules.
SHARED_UNITS = {"tests/bundler/test_differential.py": "tests/e2e/test_bundle_install.py",  # `release_bundles`
                # the TUI's session `templates` (a vault, a dataset, a trained run: a real training job each)
                **{f"tests/tui/{name}.py": "tests/tui/test_snapshots.py" for name in
                   ("test_models", "test_schedule", "test_serve", "test_train_audit")}}

# The longest units first (longest-processing-time scheduling): a 3-minute unit handed out last would keep
# one worker busy while the others idle. Seconds per unit under `make test` (three workers on two cores, a fresh
# clone, quiet), longest first; every other unit follows in the seed's random order, and tests inside a unit keep
# their random order.
LONGEST_FIRST = (
    "tests/e2e/test_bundle_install.py",                    # ~150: build, install, differential upgrade, roll back
    "tests/appliance/serve",                               # ~220: the served appliance and its tests
    "tests/appliance/optimize",                            # ~175: exports shared by the optimize tests
    "tests/tui/test_snapshots.py",                         # ~130: the TUI tests built on the session's templates
    "tests/e2e/test_demo.py",                              # ~100
    "tests/appliance/train/test_train_ddp_job.py",         # ~100
    "tests/test_tiny_models.py",                           # ~80: regenerate the tiny models (one thread)
    "tests/appliance/registry/test_genai_engine_gate.py",  # ~65
    "tests/appliance/train/test_train_jobs.py",            # ~65: a run, then the same run killed and resumed
    "tests/tui/test_acceptance_flow.py",                   # ~60
    "tests/appliance/train/test_train_nodes.py",           # ~60: two torchrun nodes on loopback through the CLI
    "tests/appliance/registry/test_retrain_scenario.py",   # ~45
    "tests/appliance/train/test_ddp.py",                   # ~30: torchrun, FSDP
)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        path = Path(str(item.path)).relative_to(REPO).as_posix()
        group = next((folder for folder in SESSION_GROUPS if path.startswith(folder + "/")),
                     SHARED_UNITS.get(path, path))
        item.add_marker(pytest.mark.xdist_group(group))
    # pytest-randomly has shuffled already (its hook wraps this one); a stable sort keeps its order elsewhere.
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.get_closest_marker("xdist_group").args[0], len(rank)))
