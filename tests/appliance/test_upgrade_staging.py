"""`airlock upgrade` copies the stick into a private directory before verifying: what it copies and refuses.

The full upgrade (verify the copy, run the copy's install.sh) is tests/e2e/test_bundle_install.py.
"""

from __future__ import annotations

import os
import stat
import threading

import pytest

from appliance.upgrade import stage_bundle
from bundler.errors import BundleError


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
