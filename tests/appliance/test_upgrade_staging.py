"""`airlock upgrade` copies the stick into a private directory before verifying: what it copies and refuses,
and the lock that lets one upgrade (or rollback) run at a time and the next one remove a killed upgrade's copy.

The full upgrade (verify the copy, run the copy's install.sh) is tests/e2e/test_bundle_install.py.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading

import pytest

from appliance.errors import AirlockError
from appliance.upgrade import stage_bundle, upgrade_lock
from bundler.errors import BundleError
from tests.conftest import REPO, run_cli


def _stick(tmp_path):
    stick = tmp_path / "stick"
    (stick / "wheels").mkdir(parents=True)
    (stick / "install.sh").write_text("#!/bin/sh\n")
    (stick / "wheels" / "a.whl").write_bytes(b"x" * 3_000_000)
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    return stick, prefix


def test_the_copy_is_private_and_complete(tmp_path):
    stick, prefix = _stick(tmp_path)
    stage = stage_bundle(stick, prefix)
    assert stage.parent == prefix and stage.name.startswith(".upgrade.")
    assert stat.S_IMODE(stage.stat().st_mode) == 0o700 and stage.stat().st_uid == os.geteuid()
    assert (stage / "wheels" / "a.whl").read_bytes() == b"x" * 3_000_000
    assert stat.S_IMODE((stage / "wheels").stat().st_mode) == 0o700
    # Changing the stick afterwards changes nothing that is verified or run.
    (stick / "install.sh").write_text("#!/bin/sh\ntouch /tmp/x\n")
    assert (stage / "install.sh").read_text() == "#!/bin/sh\n"


@pytest.mark.parametrize("kind", ["file-link", "dir-link", "fifo"])
def test_links_and_special_files_are_refused_and_nothing_is_left(tmp_path, kind):
    stick, prefix = _stick(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("not from the bundle")
    if kind == "file-link":
        (stick / "wheels" / "b.whl").symlink_to(secret)
    elif kind == "dir-link":
        (stick / "models").symlink_to(tmp_path)
    else:
        os.mkfifo(stick / "wheels" / "pipe.whl")
    # A FIFO must not block the copy: run it with a deadline.
    outcome: list[BaseException | None] = []

    def stage() -> None:
        try:
            stage_bundle(stick, prefix)
            outcome.append(None)
        except BaseException as exc:  # handed to the assertion below
            outcome.append(exc)

    worker = threading.Thread(target=stage, daemon=True)
    worker.start()
    worker.join(20)
    assert outcome, "staging blocked on a special file"
    assert isinstance(outcome[0], BundleError), outcome[0]
    assert "symlink" in str(outcome[0]) or "special file" in str(outcome[0]) or "regular file" in str(outcome[0])
    assert list(prefix.iterdir()) == []  # the partial copy is removed


# An upgrade that has copied the stick and is verifying it when it is killed.
_KILLED_UPGRADE = """
import sys, time
from pathlib import Path
from appliance.upgrade import stage_bundle, upgrade_lock
with upgrade_lock(Path(sys.argv[2])):
    print(stage_bundle(Path(sys.argv[1]), Path(sys.argv[2])), flush=True)
    time.sleep(600)
"""


def test_one_upgrade_at_a_time_and_the_next_removes_a_killed_ones_copy(tmp_path, capsys):
    stick, prefix = _stick(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the upgrade's")
    killed = subprocess.Popen([sys.executable, "-I", "-c", _KILLED_UPGRADE, str(stick), str(prefix)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        stage = prefix / os.path.basename(killed.stdout.readline().strip())
        assert stage.name.startswith(".upgrade.") and (stage / "wheels" / "a.whl").is_file()
        (prefix / ".upgrade.link").symlink_to(outside)  # removed as a link, never followed
        with pytest.raises(AirlockError, match="another `airlock upgrade` is running") as refused:
            with upgrade_lock(prefix):
                pass
        assert "wait for it to end" in refused.value.hint
        # Nor does a rollback switch releases under it (through the CLI: no vault yet, so no login).
        rollback = run_cli("upgrade", "--rollback", "--prefix", str(prefix))
        assert rollback.returncode != 0
        assert rollback.stderr.startswith(f"error: {prefix}: another `airlock upgrade` is running"), rollback.stderr
        assert (stage / "wheels" / "a.whl").is_file()  # a running upgrade's copy is left alone
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        killed.stdout.close()
    capsys.readouterr()
    with upgrade_lock(prefix):
        assert not stage.exists() and not (prefix / ".upgrade.link").is_symlink()
    assert (outside / "keep.txt").read_text() == "not the upgrade's"
    said = capsys.readouterr().out.splitlines()
    assert f"removed {stage}, the copy of an interrupted upgrade" in said
    assert sorted(p.name for p in prefix.iterdir()) == [".upgrade-lock"]
    # Without an upgrade running, the rollback gets as far as finding nothing to roll back to.
    rollback = run_cli("upgrade", "--rollback", "--prefix", str(prefix))
    assert rollback.returncode != 0 and "no previous release to roll back to" in rollback.stderr, rollback.stderr
    missing = run_cli("upgrade", "--rollback", "--prefix", str(tmp_path / "nowhere"))
    assert missing.stderr.splitlines() == [
        f"error: {tmp_path / 'nowhere'}: no such install prefix",
        "hint: give the prefix Airlock is installed in (--prefix), e.g. /opt/airlock"]
