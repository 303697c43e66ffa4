"""Who is acting, and may they: accounts' roles, enforced here in the appliance, not only in the UI.

The key agent knows who unlocked it (an operator account, `break-glass` with the recovery key,
or `scheduler` with the machine key); every command asks it through `current_session`, and
`require(db, home, action)` refuses an action the session's role does not allow, with a clear
error naming the role needed, and an audit row. Reads of metadata (lists, counts, the audit
log) need no session: whoever can read the catalog file can read them anyway. Anything that
changes state or decrypts data needs a session with the right role.

Roles (docs/adr/0006-accounts-and-roles.md):
    admin     everything: accounts, API keys, promote/rollback, schedules, upgrades, rotation, deletion
    operator  import, export for review, train, quantize/export/engine, jobs, serving, read reports
    auditor   read-only: audit log, model cards, dataset reports; never decrypts data
    scheduler (machine key) unattended retraining: operator's work plus gated promotion
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import AirlockError

if TYPE_CHECKING:
    import sqlite_utils

ROLES = ("admin", "operator", "auditor")
_OPERATOR = frozenset({
    "data.import", "data.export", "data.report", "train.start", "optimize.run", "jobs.control", "serve.control",
    "vault.verify", "vault.lock", "models.view", "models.register",
})
_AUDITOR = frozenset({"data.report", "audit.verify", "models.view", "vault.lock"})
_ADMIN_ONLY = frozenset({
    "users.manage", "keys.manage", "models.promote", "schedules.manage", "release.upgrade", "vault.rotate",
    "vault.add_slot", "vault.remove_slot", "vault.rekey", "data.delete", "vault.delete", "emergency.acknowledge",
    "models.delete", "models.policy",
})
PERMISSIONS: dict[str, frozenset[str]] = {
    "admin": _OPERATOR | _AUDITOR | _ADMIN_ONLY,
    "operator": _OPERATOR | frozenset({"audit.verify"}),
    "auditor": _AUDITOR,
    "scheduler": _OPERATOR | frozenset({"models.promote"}),
}
ALL_ACTIONS = frozenset().union(*PERMISSIONS.values())


class AccessDenied(AirlockError):
    """The session's role does not allow the action, or nobody is logged in."""


@dataclass(frozen=True)
class Session:
    account: str
    role: str
    kind: str
    """normal | emergency | scheduler."""
    origin: str

    @property
    def actor(self) -> str:
        """The audit actor: the account, plus where the unlock came from."""
        text = self.account if self.kind == "normal" else f"{self.account} [{self.kind}]"
        return f"{text} ({self.origin})" if self.origin else text

    def allows(self, action: str) -> bool:
        return action in PERMISSIONS.get(self.role, frozenset())


def origin() -> str:
    """OS user, terminal and SSH client of this process, where known:
    'os:alice tty:/dev/pts/1 ssh-claimed:10.0.0.5'.

    The OS user is the real uid's account (LOGNAME and USER are whatever the caller set). The SSH
    client comes only from the environment, which any process can set, so it is labelled as a claim.
    """
    from appliance.audit import os_user

    parts = [f"os:{os_user()}"]
    try:
        if sys.stdin is not None and sys.stdin.isatty():
            parts.append(f"tty:{os.ttyname(sys.stdin.fileno())}")
    except (OSError, ValueError):
        pass
    ssh = os.environ.get("SSH_CLIENT", "").split()
    if ssh:
        parts.append(f"ssh-claimed:{ssh[0][:64]}")
    return " ".join(parts)


def current_session(home: Path) -> Session | None:
    """The session of the running key agent for `home`, or None when the vault is locked."""
    from appliance.vault.agent import agent_status
    from appliance.vault.errors import VaultError

    try:
        status = agent_status(home)
    except VaultError:
        return None
    if status is None or not status.account:
        return None
    return Session(status.account, status.role, status.session, status.origin)


def require(db: sqlite_utils.Database, home: Path, action: str, *, unless_no_vault: bool = False
            ) -> Session | None:
    """The current session if its role allows `action`; otherwise AccessDenied (audited).

    `unless_no_vault`: on a machine whose vault was never initialized there are no accounts to
    log in with; actions that make sense there (upgrading a fresh install) proceed, returning None.
    """
    from appliance.audit import append_audit
    from appliance.catalog import transaction

    if action not in ALL_ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    session = current_session(home)
    if session is None and unless_no_vault:
        from appliance.vault.records import vault_id

        if vault_id(db) is None:
            return None
    if session is None:
        from appliance.vault.errors import VaultLockedError
        from appliance.vault.records import require_initialized

        require_initialized(db)
        raise VaultLockedError(hint=f"{_describe(action)} needs you to log in: `airlock vault unlock --user NAME` "
                                    "with your own account")
    if not session.allows(action):
        needed = sorted(role for role, allowed in PERMISSIONS.items() if action in allowed and role != "scheduler")
        with transaction(db):
            append_audit(db, "access.denied", action, {"account": session.account, "role": session.role},
                         actor=session.actor)
        raise AccessDenied(f"{_describe(action)} needs the {' or '.join(needed)} role; "
                           f"{session.account} is {session.role}",
                           hint="ask an admin to do it, or to change your role (`airlock users add ...`)")
    return session


def _describe(action: str) -> str:
    return {"data.delete": "deleting a dataset", "data.export": "exporting data", "data.import": "importing data",
            "data.report": "reading an import report", "users.manage": "managing accounts",
            "vault.rotate": "rotating the vault's keys", "vault.delete": "deleting a vault object",
            "vault.add_slot": "adding a key slot", "vault.remove_slot": "removing a key slot",
            "vault.rekey": "re-keying the vault", "vault.verify": "verifying the vault's files",
            "jobs.control": "controlling jobs", "train.start": "training", "models.promote": "promoting a model",
            "models.register": "registering a model version", "models.delete": "deleting a model version",
            "models.policy": "changing a task's gates and auto-promotion", "schedules.manage": "changing schedules",
            "release.upgrade": "upgrading the appliance", "keys.manage": "managing API keys",
            "serve.control": "starting the inference server", "optimize.run": "optimizing or exporting a model",
            "emergency.acknowledge": "acknowledging emergency access"}.get(action, f"'{action}'")
