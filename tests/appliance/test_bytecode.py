"""A new release's byte-code (appliance/bytecode.py, ADR 0021): the previous release's pyc for every unchanged
source when it is valid and only the installing user could have written it; everything else compiled.

The install story (tests/e2e/test_bundle_install.py) runs it through install.sh on the real stack.
"""

from __future__ import annotations

import importlib.util
import os
import py_compile
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.bytecode import BytecodeReport, reuse_previous_bytecode
from tests.conftest import REPO

SOURCES = {
    "same.py": "VALUE = 'unchanged'\n",
    "pkg/__init__.py": "",
    "pkg/inner.py": "def f():\n    return 41 + 1\n",
    "changed.py": "VALUE = 1\n",
    "stale.py": "VALUE = 'stale'\n",
    "group_writable.py": "VALUE = 'g'\n",
    "linked_pyc.py": "VALUE = 'l'\n",
    "new_only.py": "VALUE = 'new'\n",
}
REUSED = {"same.py", "pkg/__init__.py", "pkg/inner.py"}


def pyc_of(source: Path) -> Path:
    return Path(importlib.util.cache_from_source(str(source)))


def _site(root: Path, sources: dict[str, str]) -> Path:
    for name, text in sources.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def sites(tmp_path: Path) -> tuple[Path, Path]:
    old = _site(tmp_path / "old", {k: v for k, v in SOURCES.items() if k != "new_only.py"})
    past = time.time() - 3600  # the previous release was installed an hour ago
    for source in old.rglob("*.py"):
        os.utime(source, (past, past))
        py_compile.compile(str(source), doraise=True)  # timestamp-based, as pip and compileall write them
    # The old source changed after its pyc was written: the pyc is not valid for it (nor, then, for the new one).
    os.utime(old / "stale.py", (past + 60, past + 60))
    pyc_of(old / "group_writable.py").chmod(0o664)
    linked = pyc_of(old / "linked_pyc.py")
    linked.rename(linked.with_name("elsewhere.pyc"))
    linked.symlink_to("elsewhere.pyc")
    new = _site(tmp_path / "new", {**SOURCES, "changed.py": "VALUE = 2\n"})
    return old, new


def test_unchanged_sources_take_the_valid_private_pyc_of_the_previous_release(sites):
    old, new = sites
    report = BytecodeReport()
    reuse_previous_bytecode(old, new, report)
    assert report.sources == len(SOURCES)
    given = {p.relative_to(new).as_posix() for p in new.rglob("*.py") if pyc_of(p).exists()}
    assert given == REUSED and report.reused == len(REUSED)
    for name in REUSED:
        assert pyc_of(new / name).read_bytes() == pyc_of(old / name).read_bytes()
    # The import system takes them as they are: `python -v` says each pyc matches its source (a stale one would
    # be recompiled in memory, with -B written nowhere, on every start).
    verbose = subprocess.run([sys.executable, "-I", "-B", "-v", "-c",
                              f"import sys; sys.path.insert(0, {str(new)!r}); import same, pkg.inner"],
                             capture_output=True, text=True, timeout=60, check=True)
    for name in REUSED:
        assert f"# {pyc_of(new / name)} matches {new / name}" in verbose.stderr
    assert "stale" not in verbose.stderr


def test_a_pyc_anyone_else_could_have_written_is_never_taken(sites):
    old, new = sites
    same_pyc = pyc_of(old / "same.py")
    if os.geteuid() == 0:
        os.chown(same_pyc, 65534, 65534)  # another owner (only root can give a file away)
    else:
        same_pyc.chmod(0o646)
    (old / "pkg" / "__pycache__").chmod(0o777)  # a folder anyone could have written into
    report = BytecodeReport()
    reuse_previous_bytecode(old, new, report)
    assert report.reused == 0 and not list(new.rglob("*.pyc"))


def test_nothing_is_taken_from_a_previous_site_packages_others_can_write(sites):
    old, new = sites
    old.chmod(0o777)
    report = BytecodeReport()
    reuse_previous_bytecode(old, new, report)
    assert report.reused == 0 and not list(new.rglob("*.pyc"))
    old.chmod(0o755)
    reuse_previous_bytecode(old, new, report)
    assert report.reused == len(REUSED)


def _venv(path: Path, sources: dict[str, str]) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    site = next(path.glob("lib/python3.*/site-packages"))
    _site(site, sources)
    return site


def step(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -I -m appliance.bytecode ARGS` with the venv's interpreter (this checkout's appliance)."""
    code = f"import sys; sys.path.append({str(REPO)!r}); from appliance.bytecode import main; sys.exit(main())"
    return subprocess.run([str(venv / "bin" / "python"), "-I", "-c", code, *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_the_release_step_reuses_then_compiles_the_rest_in_a_venv(tmp_path):
    """`python -m appliance.bytecode` as install.sh runs it, with a venv's own interpreter."""
    sources = {"same.py": "A = 1\n", "changed.py": "B = 1\n", "pkg/__init__.py": "C = 1\n"}
    old_site = _venv(tmp_path / "old", sources)
    new_site = _venv(tmp_path / "new", {**sources, "changed.py": "B = 2\n", "added.py": "D = 1\n"})

    first = step(tmp_path / "old")
    assert (first.returncode, first.stdout) == (0, "byte-code: compiled on every core (no previous release to "
                                                   "take it from)\n"), first.stderr
    assert all(pyc_of(p).is_file() for p in old_site.rglob("*.py"))
    upgrade = step(tmp_path / "new", "--previous", str(tmp_path / "old"))
    assert upgrade.returncode == 0, upgrade.stderr
    assert upgrade.stdout == "byte-code: 2 of 4 modules taken from the previous release, the rest compiled\n"
    assert pyc_of(new_site / "same.py").read_bytes() == pyc_of(old_site / "same.py").read_bytes()
    assert pyc_of(new_site / "changed.py").read_bytes() != pyc_of(old_site / "changed.py").read_bytes()
    assert all(pyc_of(p).is_file() for p in new_site.rglob("*.py"))
    # Outside a venv it refuses with one line (it would compile the system's site-packages).
    outside = subprocess.run([sys._base_executable, "-I", "-c", "import sys; sys.path.append(sys.argv[1]); "
                              "from appliance.bytecode import main; sys.exit(main([]))", str(REPO)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert outside.returncode == 2
    assert outside.stderr == "appliance.bytecode: not in a venv; run it with the release's venv/bin/python\n"


def test_a_pyc_it_cannot_write_stops_it_with_one_line(tmp_path):
    sources = {"pkg/__init__.py": "", "pkg/mod.py": "A = 1\n"}
    _venv(tmp_path / "old", sources)
    assert step(tmp_path / "old").returncode == 0
    new_site = _venv(tmp_path / "new", sources)
    (new_site / "pkg" / "__pycache__").write_text("a file where the folder goes\n")
    failed = step(tmp_path / "new", "--previous", str(tmp_path / "old"))
    assert failed.returncode == 1 and failed.stdout == ""
    assert len(failed.stderr.splitlines()) == 1 and failed.stderr.startswith("appliance.bytecode: [Errno 17]")
    assert "check the free space and permissions under" in failed.stderr
