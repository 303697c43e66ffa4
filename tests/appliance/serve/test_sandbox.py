"""The server under the unit's sandbox, where systemd is not PID 1: the same restrictions applied by hand.

install.sh's airlock-serve.service runs `airlock serve` as the service account with systemd's
hardening (ADR 0010). Here systemd does not run, so this test applies what util-linux can apply
to a real `airlock serve` of the shared appliance (a copy of its home, owned by a system account):

  applied                                     as the unit says
  the service account (setpriv --reuid)       User=
  no capabilities, none inheritable           CapabilityBoundingSet= (empty), AmbientCapabilities=
  no_new_privs                                NoNewPrivileges=yes
  umask 077                                   UMask=0077
  / read-only, AIRLOCK_HOME writable          ProtectSystem=strict + ReadWritePaths=AIRLOCK_HOME
  /proc/sys and /sys read-only                ProtectKernelTunables=yes
  a private, empty /tmp                       PrivateTmp=yes
  a /dev of null, zero, full, random, urandom, tty and shm only   PrivateDevices=yes
  /root and /home hidden (empty tmpfs)        ProtectHome=yes
  the key from a machine key only that account can read, via ExecStartPre's `vault unlock --machine-key`

  not applied here (no seccomp or BPF tool; the unit sets them): SystemCallFilter,
  RestrictAddressFamilies, RestrictNamespaces, PrivateUsers, ProtectProc, ProtectClock, LockPersonality.

The server answers the `openai` client with the promoted version and hot-swaps to the next one
(loaded from its ONNX export) when it is promoted: one server start and one hot swap beyond the
shared appliance.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.appliance.serve.conftest import LISTENING, PASSPHRASE, SWAP_TASK, Appliance
from tests.conftest import REPO, SERVICE_USER, ensure_service_user

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create the account and namespaces"),
              pytest.mark.skipif(shutil.which("setpriv") is None or shutil.which("unshare") is None,
                                 reason="needs util-linux's setpriv and unshare"),
              pytest.mark.timeout(600)]
TASK = SWAP_TASK  # served from a copy of the shared home
SYSTEM_PYTHON = "/usr/bin/python3.11"

# Run as root inside `unshare -m`: set the namespace up as systemd would, check the sandbox
# holds, then become the service account and do what the unit does (ExecStartPre, ExecStart).
HARNESS = r"""
set -eu
mount --make-rprivate /
mount --bind "$AIRLOCK_HOME" "$AIRLOCK_HOME"
# The checkout (the code the unit runs) also under the sandbox's root: a checkout under /tmp vanishes below.
mount --bind "$CHECKOUT" "$MIRROR"
mount -o remount,bind,ro /
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
mount -o remount,bind,ro /sys
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
for hidden in /root /home; do [ ! -d "$hidden" ] || mount -t tmpfs -o mode=755 tmpfs "$hidden"; done
mount -t tmpfs -o mode=755,nosuid tmpfs /dev
for node in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9" "tty 5 0"; do
    set -- $node; mknod -m 666 "/dev/$1" c "$2" "$3"
done
mkdir /dev/shm && mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
as_service() {
    setpriv --reuid="$SERVICE_USER" --regid="$SERVICE_USER" --init-groups --inh-caps=-all --bounding-set=-all \
        --no-new-privs -- "$@"
}
# The sandbox holds: the account can write its home, but not a directory of its own outside it.
as_service sh -c 'umask 077; touch "$AIRLOCK_HOME/probe" && rm "$AIRLOCK_HOME/probe"'
if as_service touch "$OUTSIDE/probe" 2>/dev/null; then echo "SANDBOX LEAK: wrote outside AIRLOCK_HOME"; exit 97; fi
if [ -e /dev/sda ] || [ -e /dev/mem ]; then echo "SANDBOX LEAK: physical devices visible"; exit 98; fi
cd "$AIRLOCK_HOME"
umask 077
as_service "$PY" -I -m appliance.cli vault unlock --machine-key
exec setpriv --reuid="$SERVICE_USER" --regid="$SERVICE_USER" --init-groups --inh-caps=-all --bounding-set=-all \
    --no-new-privs -- "$PY" -I -m appliance.cli serve --task "$TASK" --host 127.0.0.1 --port 0 --workers 1
"""


def service_venv(root: Path) -> Path:
    """A venv of the system Python with this checkout's packages: the service account cannot run
    the checkout's own interpreter when it lives under /root (pyenv), which is 0700.

    Its paths name the checkout where it is (for the commands run outside the sandbox) and again under
    `root/checkout`, where the harness bind-mounts it: the sandbox's private /tmp hides a checkout under /tmp."""
    venv = root / "venv"
    subprocess.run([SYSTEM_PYTHON, "-I", "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((REPO / ".venv" / "lib").glob("python3.*/site-packages")).relative_to(REPO)
    mirror = root / "checkout"
    mirror.mkdir(mode=0o755)
    target = next((venv / "lib").glob("python3.*/site-packages"))
    (target / "airlock-checkout.pth").write_text(f"{REPO}\n{REPO / site}\n{mirror}\n{mirror / site}\n")
    return venv / "bin" / "python"


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"{SYSTEM_PYTHON} is not installed")
def test_server_runs_as_the_service_account_in_the_units_sandbox(appliance: Appliance, swap_task: str):
    import openai

    from appliance.catalog import open_catalog
    from appliance.registry.promotion import promote
    from appliance.registry.versions import production
    from appliance.serve.api_keys import create_key

    # A copy of the shared appliance's home for the service account, with task `swap` (v1: run qa3 on PyTorch, v2:
    # run qa2's ONNX export). The hot-swap tests promote within `swap` in the shared home, so the copy's production
    # version is whichever they left; this test serves it and hot-swaps to the other one, in the copy only.
    account = ensure_service_user()
    root = Path(tempfile.mkdtemp(prefix="airlock-sandbox-", dir="/var/tmp"))
    try:
        root.chmod(0o755)
        home = root / "home"
        shared = open_catalog(appliance.home)
        try:
            shared.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            shutil.copytree(appliance.home, home, symlinks=True)
        finally:
            shared.close()
        db = open_catalog(home)
        try:
            first = production(db, swap_task).id.rsplit("-", 1)[1]
            api_key = create_key(db, "sandbox-client", (swap_task,), actor="test")[1]
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
        then = "v2" if first == "v1" else "v1"
        (root / "outside").mkdir()
        (root / "passphrase").write_text(PASSPHRASE + "\n")
        for path in (home, *home.rglob("*"), root / "outside", root / "passphrase"):
            os.lchown(path, account.pw_uid, account.pw_gid)
        home.chmod(0o700)
        python = service_venv(root)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": str(home), "AIRLOCK_HOME": str(home),
               "AIRLOCK_KDF_PROFILE": "test", "SERVICE_USER": SERVICE_USER, "PY": str(python), "TASK": TASK,
               "OUTSIDE": str(root / "outside"), "CHECKOUT": str(REPO), "MIRROR": str(root / "checkout")}
        # The site's `vault add-slot --kind machine`, run as the account: the key file is its own, 0600.
        added = subprocess.run(["setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_USER}", "--init-groups",
                                str(python), "-I", "-m", "appliance.cli", "vault", "add-slot", "--kind", "machine",
                                "--passphrase-file", str(root / "passphrase")],
                               env=env, cwd=home, capture_output=True, text=True, check=False, timeout=120)
        assert added.returncode == 0, added.stderr
        key_file = home / "vault" / "machine.key"
        assert key_file.stat().st_uid == account.pw_uid and key_file.stat().st_mode & 0o077 == 0

        process = subprocess.Popen(["unshare", "-m", "sh", "-c", HARNESS], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                if LISTENING.search(line):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        try:
            assert ready.wait(180) and process.poll() is None, "".join(lines)[-3000:]
            match = LISTENING.search("".join(lines))
            assert match, "".join(lines)[-3000:]
            status = Path(f"/proc/{process.pid}/status").read_text()
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            assert fields["Uid"].split()[0] == str(account.pw_uid)
            assert fields["CapBnd"].strip() == fields["CapEff"].strip() == "0000000000000000"
            assert fields["NoNewPrivs"].strip() == "1"

            client = openai.OpenAI(base_url=f"http://{match.group(2)}:{match.group(3)}/v1", api_key=api_key,
                                   max_retries=0, timeout=60)
            answer = client.chat.completions.create(model=TASK, max_tokens=4,
                                                    messages=[{"role": "user", "content": "Status of pump 7?"}])
            assert answer.choices[0].message.content is not None and answer.model.startswith(TASK)
            served = client.models.list().model_dump()["data"]
            assert next(m for m in served if m["id"] == TASK)["airlock"]["version"] == first

            # Hot swap under the sandbox: promoting the other version (PyTorch <-> ONNX Runtime) switches the server.
            db = open_catalog(home)
            try:
                promote(db, f"{TASK}-{then}", actor="test", reason="sandbox hot swap")
            finally:
                db.close()
            deadline = time.monotonic() + 240
            while next(m for m in client.models.list().model_dump()["data"]
                       if m["id"] == TASK)["airlock"]["version"] != then:
                assert time.monotonic() < deadline and process.poll() is None, "".join(lines)[-3000:]
                time.sleep(0.5)
            again = client.chat.completions.create(model=TASK, max_tokens=4,
                                                   messages=[{"role": "user", "content": "Status of pump 8?"}])
            assert again.choices[0].message.content is not None
            # All the server wrote is in its home, and the account's alone.
            assert all(p.lstat().st_uid == account.pw_uid for p in home.rglob("*")), "a file not the account's"
            assert list((root / "outside").iterdir()) == []
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        _stop_agents_of(root)
        shutil.rmtree(root, ignore_errors=True)


def _stop_agents_of(root: Path) -> None:
    """The key agent `vault unlock` started in the namespace (its socket is in the private /tmp)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if b"appliance.vault.agent" in argv and any(arg.startswith(str(root).encode()) for arg in argv):
            os.kill(int(proc.name), signal.SIGTERM)
