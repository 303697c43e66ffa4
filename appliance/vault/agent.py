"""The key agent: a detached per-user process that holds the root key until its idle timeout.

    python -m appliance.vault.agent --home H --socket S --vault-id V --idle-timeout SECONDS
    (root key on stdin; prints "ready" once listening; started by `airlock vault unlock`)

It listens on a Unix socket (0600) in a private 0700 runtime directory and answers one JSON line
per connection from processes of the same uid (checked with SO_PEERCRED). The root key never
leaves it: clients send wrapped keys and get back the DEK they need (or newly wrapped keys).
Any key request restarts the idle timer; at expiry, on `lock` or on SIGTERM it wipes its copy,
removes the socket and exits: the process exit is what really clears the memory. Core dumps are
disabled before the key is read.

Before answering `status` or a key request the agent checks, in the catalog, that its session
still stands (ADR 0012): the account is active, the slot it was opened with still exists, and its
root key still opens the active KEK (after `vault rekey` it does not); it also checks every
REVOCATION_POLL_S seconds while idle. If not, it refuses, wipes the key and exits: disabling an
account or removing a slot ends its sessions within seconds, whichever OS user runs them.

One agent per vault and OS user: the agent holds an exclusive lock on `agent-<hash>.lock` for its
whole life, and `vault unlock` holds `agent-<hash>.unlock` while it replaces an agent, so two
unlocks racing cannot leave an unreachable agent holding the key.

The socket lives in $XDG_RUNTIME_DIR/airlock or /tmp/airlock-<uid>, named after a hash of
AIRLOCK_HOME: short enough for the 107-byte sun_path limit wherever AIRLOCK_HOME lies, and one
agent per vault.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.vault.errors import VaultError, VaultLockedError
from appliance.vault.keys import LocalKeys, disable_core_dumps

MAX_MESSAGE = 64 * 1024
CLIENT_TIMEOUT_S = 10.0
START_TIMEOUT_S = 15.0
LOCK_WAIT_S = 5.0
REVOCATION_POLL_S = 2.0
UNKNOWN = ""
"""`session_revoked`'s answer when the catalog cannot be read just now."""
DEFAULT_IDLE_TIMEOUT_S = 15 * 60
KEY_OPS = ("new_kek", "new_dek", "unwrap_dek", "rewrap_dek")


@dataclass(frozen=True)
class AgentStatus:
    vault_id: str
    seconds_left: int
    idle_timeout_s: int
    pid: int
    account: str = ""
    """Who unlocked: an operator account, `break-glass` (recovery key) or `scheduler` (machine key)."""
    role: str = ""
    session: str = "normal"
    """normal | emergency (break-glass) | scheduler."""
    origin: str = ""
    """OS user, terminal and SSH client of the unlocking process, for the audit actor."""


@dataclass(frozen=True)
class Identity:
    """What an unlock proved, handed to the agent so every later command knows who is acting."""

    account: str
    role: str
    session: str = "normal"
    origin: str = ""
    slot_id: str = ""
    """The key slot the unlock opened: the session ends when that slot is removed."""


def runtime_dir() -> Path:
    """A private (0700, ours, not a symlink) directory for agent sockets."""
    uid = os.getuid()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.stat(xdg).st_uid == uid:
        path = Path(xdg) / "airlock"
    else:
        path = Path("/tmp") / f"airlock-{uid}"  # noqa: S108 - checked below: ours, 0700, not a symlink
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        raise VaultError(f"the agent directory {path} is not a private directory of this account",
                         hint=f"remove {path} (someone else may have created it) and run the command again")
    return path


def socket_path(home: Path) -> Path:
    return runtime_dir() / f"agent-{_digest(home)}.sock"


def _digest(home: Path) -> str:
    return hashlib.sha256(str(home.resolve()).encode("utf-8")).hexdigest()[:16]


def _lock_file(home: Path, suffix: str) -> int:
    fd = os.open(runtime_dir() / f"agent-{_digest(home)}.{suffix}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.set_inheritable(fd, False)
    return fd


def _flock(fd: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


@contextlib.contextmanager
def unlock_serialized(home: Path):
    """Held by `vault unlock` while it checks, replaces and starts the agent: unlocks run one at a time."""
    fd = _lock_file(home, "unlock")
    try:
        if not _flock(fd, START_TIMEOUT_S + LOCK_WAIT_S):
            raise VaultError("another `airlock vault unlock` is still running for this vault",
                             hint="wait for it to finish, then try again")
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------- client side


class AgentClient:
    """KeyOps over the agent's socket. Creating one disables core dumps: this process will hold DEKs."""

    def __init__(self, home: Path, expected_vault_id: str | None = None) -> None:
        disable_core_dumps()
        self.path = socket_path(home)
        if expected_vault_id is not None and self.status().vault_id != expected_vault_id:
            raise VaultLockedError("vault is locked (the running agent serves another vault)")

    def call(self, op: str, **fields) -> dict:
        request = json.dumps({"op": op, **fields}).encode("utf-8") + b"\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(CLIENT_TIMEOUT_S)
                sock.connect(str(self.path))
                sock.sendall(request)
                reply = _read_line(sock)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
            raise VaultLockedError() from None
        except (TimeoutError, OSError, ValueError) as exc:
            raise VaultError(f"the key agent at {self.path} did not answer ({type(exc).__name__})",
                             hint="run `airlock vault lock`, then `airlock vault unlock`") from None
        try:
            answer = json.loads(reply)
        except ValueError:
            raise VaultError(f"the key agent at {self.path} sent a malformed reply",
                             hint="run `airlock vault lock`, then `airlock vault unlock`") from None
        if answer.get("revoked"):  # the agent ended its session (and exits): the vault is locked for us
            raise VaultLockedError(str(answer.get("error", "vault is locked")), hint=str(answer.get("hint", "")))
        if not answer.get("ok"):
            raise VaultError(str(answer.get("error", "the key agent refused")), hint=str(answer.get("hint", "")))
        return answer

    def status(self) -> AgentStatus:
        a = self.call("status")
        return AgentStatus(str(a["vault_id"]), int(a["seconds_left"]), int(a["idle_timeout_s"]), int(a["pid"]),
                           str(a.get("account", "")), str(a.get("role", "")), str(a.get("session", "normal")),
                           str(a.get("origin", "")))

    def lock(self) -> None:
        self.call("lock")

    def new_kek(self, version: int) -> bytes:
        return _b(self.call("new_kek", version=version)["wrapped_kek"])

    def new_dek(self, kek_version: int, wrapped_kek: bytes, object_id: str) -> tuple[bytes, bytes]:
        a = self.call("new_dek", kek_version=kek_version, wrapped_kek=_s(wrapped_kek), object_id=object_id)
        return _b(a["dek"]), _b(a["wrapped_dek"])

    def unwrap_dek(self, kek_version: int, wrapped_kek: bytes, object_id: str, wrapped_dek: bytes) -> bytes:
        return _b(self.call("unwrap_dek", kek_version=kek_version, wrapped_kek=_s(wrapped_kek), object_id=object_id,
                            wrapped_dek=_s(wrapped_dek))["dek"])

    def rewrap_dek(self, old_version: int, old_wrapped_kek: bytes, new_version: int, new_wrapped_kek: bytes,
                   object_id: str, wrapped_dek: bytes) -> bytes:
        return _b(self.call("rewrap_dek", old_version=old_version, old_wrapped_kek=_s(old_wrapped_kek),
                            new_version=new_version, new_wrapped_kek=_s(new_wrapped_kek), object_id=object_id,
                            wrapped_dek=_s(wrapped_dek))["wrapped_dek"])


def agent_status(home: Path) -> AgentStatus | None:
    """The running agent's status, or None when the vault is locked."""
    try:
        return AgentClient(home).status()
    except VaultLockedError:
        return None


def start_agent(home: Path, root_key: bytes, vault_id: str, idle_timeout_s: int,
                identity: Identity | None = None) -> AgentStatus:
    """Start a detached agent holding `root_key` (and who unlocked it) and wait until it listens."""
    path = socket_path(home)  # the agent replaces a stale socket once it holds the instance lock
    identity = identity or Identity("", "")
    command = [sys.executable, "-I", "-m", "appliance.vault.agent", "--home", str(home), "--socket", str(path),
               "--vault-id", vault_id, "--idle-timeout", str(idle_timeout_s), "--account", identity.account,
               "--role", identity.role, "--session", identity.session, "--origin", identity.origin,
               "--slot-id", identity.slot_id]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True, cwd="/")
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        proc.stdin.write(root_key)
        proc.stdin.close()
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else b""
    finally:
        proc.stdout.close()
    if line.strip() != b"ready":
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise VaultError("the key agent did not start", hint="run `airlock --debug vault unlock` and report the output")
    status = agent_status(home)
    if status is None:
        raise VaultError("the key agent started but does not answer", hint="run `airlock vault unlock` again")
    return status


# ---------------------------------------------------------------- agent side


def serve(home: Path, path: Path, vault_id: str, idle_timeout_s: int, root_key: bytes,
          identity: Identity | None = None) -> str:
    """Answer requests until idle timeout or `lock`. Returns why it stopped."""
    keys = LocalKeys(root_key)
    identity = identity or Identity("", "")
    # Only the holder of the instance lock (main) gets here: a socket left at `path` is a killed
    # agent's. Unlinking it earlier, before the lock, could cut a live agent off from its clients.
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old_umask = os.umask(0o177)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    bound_inode = path.stat().st_ino
    server.listen(16)
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # our parent stops reading stdout now
    deadline = time.monotonic() + idle_timeout_s
    reason = "idle_timeout"
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            server.settimeout(min(remaining, REVOCATION_POLL_S))
            try:
                conn, _ = server.accept()
            except TimeoutError:
                # Also without requests: a disabled account's agent (maybe another OS user's, out
                # of the admin's reach) notices within REVOCATION_POLL_S and wipes its key.
                why = session_revoked(home, keys, identity)
                if why:  # None: still valid; UNKNOWN: ask again at the next poll or request
                    reason = f"session_revoked: {why}"
                    break
                continue
            with conn:
                op, reply = _handle(conn, keys, vault_id, idle_timeout_s, deadline, identity, home)
                if op in KEY_OPS and reply.get("ok"):
                    deadline = time.monotonic() + idle_timeout_s
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply).encode("utf-8") + b"\n")
            if op == "lock":
                reason = "locked"
                break
            if op == "revoked":
                reason = f"session_revoked: {reply['why']}"
                break
    except SystemExit:
        reason = "terminated"
    finally:
        keys.wipe()
        server.close()
        with contextlib.suppress(OSError):
            if path.stat().st_ino == bound_inode:
                path.unlink()
    return reason


def session_revoked(home: Path, keys: LocalKeys, identity: Identity) -> str | None:
    """Why this agent's session no longer stands, or None. Read straight from the catalog (read-only).

    An account that was disabled, a slot that was removed, a vault that was re-keyed, a catalog
    that is gone: each ends the session. A catalog that cannot be read just now (an I/O error, a
    lock) returns UNKNOWN: the request is refused (fail closed) but the session is not ended, so
    a passing hiccup does not log out a training job.
    """
    from appliance.catalog import CATALOG_FILENAME
    from appliance.vault.keys import kek_aad, unwrap_key

    path = home / CATALOG_FILENAME
    if not path.is_file():
        return "the catalog is gone"
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return UNKNOWN
    try:
        if identity.session == "normal" and identity.account:
            row = conn.execute("SELECT state, slot_id FROM users WHERE name = ?", [identity.account]).fetchone()
            if row is None or row[0] != "active":
                return f"the account {identity.account} was disabled"
            if identity.slot_id and row[1] != identity.slot_id:
                return f"the key slot of {identity.account} was replaced"
        if identity.slot_id and conn.execute("SELECT 1 FROM vault_key_slots WHERE slot_id = ?",
                                             [identity.slot_id]).fetchone() is None:
            return f"the key slot {identity.slot_id} was removed"
        kek = conn.execute("SELECT version, wrapped_kek FROM vault_keks WHERE state = 'active'"
                           " ORDER BY version DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        return UNKNOWN
    finally:
        conn.close()
    if kek is None:
        return "the vault has no active KEK"
    try:
        unwrap_key(keys._root_key(), bytes(kek[1]), kek_aad(int(kek[0])), "the active KEK")
    except VaultError:
        return "the vault was re-keyed"
    return None


def _handle(conn: socket.socket, keys: LocalKeys, vault_id: str, idle_timeout_s: int,
            deadline: float, identity: Identity, home: Path) -> tuple[str, dict]:
    conn.settimeout(CLIENT_TIMEOUT_S)
    _pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid != os.getuid():
        return "refused", {"ok": False, "error": f"the key agent serves uid {os.getuid()} only (peer uid {uid})"}
    try:
        request = json.loads(_read_line(conn))
        op = str(request.get("op"))
        if op in ("status", *KEY_OPS):
            why = session_revoked(home, keys, identity)
            if why == UNKNOWN:
                return "error", {"ok": False, "error": "the key agent cannot read the catalog to check the session",
                                 "hint": "check the catalog's file and disk (`airlock doctor`), then retry"}
            if why is not None:
                who = identity.account or "this agent"
                return "revoked", {"ok": False, "revoked": True, "why": why,
                                   "error": f"vault is locked: the session of {who} ended ({why})",
                                   "hint": "log in again with `airlock vault unlock --user NAME`"}
        if op == "status":
            return op, {"ok": True, "vault_id": vault_id, "idle_timeout_s": idle_timeout_s, "pid": os.getpid(),
                        "seconds_left": max(0, round(deadline - time.monotonic())), "account": identity.account,
                        "role": identity.role, "session": identity.session, "origin": identity.origin}
        if op == "lock":
            return op, {"ok": True}
        if op == "new_kek":
            return op, {"ok": True, "wrapped_kek": _s(keys.new_kek(int(request["version"])))}
        if op == "new_dek":
            dek, wrapped = keys.new_dek(int(request["kek_version"]), _b(request["wrapped_kek"]),
                                        str(request["object_id"]))
            return op, {"ok": True, "dek": _s(dek), "wrapped_dek": _s(wrapped)}
        if op == "unwrap_dek":
            dek = keys.unwrap_dek(int(request["kek_version"]), _b(request["wrapped_kek"]), str(request["object_id"]),
                                  _b(request["wrapped_dek"]))
            return op, {"ok": True, "dek": _s(dek)}
        if op == "rewrap_dek":
            wrapped = keys.rewrap_dek(int(request["old_version"]), _b(request["old_wrapped_kek"]),
                                      int(request["new_version"]), _b(request["new_wrapped_kek"]),
                                      str(request["object_id"]), _b(request["wrapped_dek"]))
            return op, {"ok": True, "wrapped_dek": _s(wrapped)}
        return op, {"ok": False, "error": f"unknown agent operation {op[:40]!r}"}
    except VaultError as exc:
        return "error", {"ok": False, "error": exc.message, "hint": exc.hint}
    except (ValueError, KeyError, TypeError, OSError):
        return "error", {"ok": False, "error": "malformed request to the key agent"}


def _audit_idle_lock(home: Path, reason: str, account: str = "") -> None:
    """Best effort: the agent's own exit is recorded when nobody asked for it."""
    from appliance.audit import append_audit
    from appliance.catalog import CATALOG_FILENAME, open_catalog

    if not (home / CATALOG_FILENAME).is_file():
        return
    with contextlib.suppress(Exception):
        db = open_catalog(home)
        append_audit(db, "vault.lock", "vault", {"reason": reason, "account": account},
                     actor=f"agent:{account}" if account else None)
        db.close()


def _read_line(sock: socket.socket) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise ValueError("message too long")
    return bytes(data)


def _s(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _b(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def main(argv: list[str] | None = None) -> int:
    disable_core_dumps()  # before the key arrives
    parser = argparse.ArgumentParser(prog="python -m appliance.vault.agent")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--vault-id", required=True)
    parser.add_argument("--idle-timeout", type=int, default=DEFAULT_IDLE_TIMEOUT_S)
    parser.add_argument("--account", default="")
    parser.add_argument("--role", default="")
    parser.add_argument("--session", default="normal")
    parser.add_argument("--origin", default="")
    parser.add_argument("--slot-id", default="")
    args = parser.parse_args(argv)
    root_key = sys.stdin.buffer.read(32)
    if len(root_key) != 32:
        return 2
    # One agent per vault and OS user, held until this process exits (the kernel drops the lock).
    # An agent told to lock may take a moment to exit: wait for it, never run beside it.
    instance = _lock_file(args.home, "lock")
    if not _flock(instance, LOCK_WAIT_S):
        return 3
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    reason = serve(args.home, args.socket, args.vault_id, max(1, args.idle_timeout), root_key,
                   Identity(args.account, args.role, args.session, args.origin, args.slot_id))
    del root_key
    if reason != "locked":  # `vault lock` writes its own row, with the operator as actor
        _audit_idle_lock(args.home, reason, args.account)
    os.close(instance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
