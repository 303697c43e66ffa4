"""`airlock users add|list|disable|passwd|emergencies|ack-emergency`: one account per person."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli_output import echo_json, echo_table

_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
_admin_passphrase = click.option("--admin-passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
                                 help="Your own (admin) passphrase, from this file; asked for when missing.")
_recovery = click.option("--recovery-key-file", type=click.Path(dir_okay=False, path_type=Path),
                         help="In an emergency session: the recovery key instead of an admin passphrase.")
_kdf_memory = click.option("--kdf-memory-mib", type=click.IntRange(min=8, max=4096),
                           help="Argon2id memory for the new slot (default: tuned to ~1 s).")


def _context():
    from appliance.catalog import open_catalog
    from appliance.paths import ensure_home

    return open_catalog(), ensure_home()


def _admin_credential(session, admin_passphrase_file: Path | None, recovery_key_file: Path | None):
    from appliance.vault.cli import _credential

    if session.kind == "emergency" and recovery_key_file is None:
        from appliance.vault.accounts import AccountError

        raise AccountError("this is an emergency session: confirm with the recovery key",
                           hint="pass --recovery-key-file FILE")
    if recovery_key_file is not None:
        return _credential(Path("."), None, recovery_key_file, False, None)
    if admin_passphrase_file is None:
        from appliance.vault.lifecycle import Credential

        return Credential.passphrase(click.prompt(f"Passphrase of {session.account} (to confirm)", hide_input=True))
    return _credential(Path("."), admin_passphrase_file, None, False, None)


@click.group()
def users() -> None:
    """Operator accounts: each has its own passphrase and a role (admin, operator, auditor)."""
    from appliance.vault.keys import disable_core_dumps

    disable_core_dumps()


@users.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["admin", "operator", "auditor"]), required=True)
@click.option("--passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
              help="The new account's first passphrase, from this file (hand it over; they change it).")
@_admin_passphrase
@_recovery
@_kdf_memory
def users_add(name: str, role: str, passphrase_file: Path | None, admin_passphrase_file: Path | None,
              recovery_key_file: Path | None, kdf_memory_mib: int | None) -> None:
    """Add an account with its own key slot. Needs an admin session and the admin's passphrase again."""
    from appliance.access import require
    from appliance.vault.accounts import add_user, check_name, check_role
    from appliance.vault.cli import _new_passphrase
    from appliance.vault.keyslots import passphrase_kdf

    db, home = _context()
    check_name(name)
    check_role(role)
    session = require(db, home, "users.manage")
    credential = _admin_credential(session, admin_passphrase_file, recovery_key_file)
    passphrase = _new_passphrase(passphrase_file, prompt=f"First passphrase for {name}")
    slot_id = add_user(db, session, credential, name, role, passphrase, passphrase_kdf(memory_mib=kdf_memory_mib))
    click.echo(f"account {name} ({role}) added with its own key slot {slot_id}; "
               f"they log in with `airlock vault unlock --user {name}`")


@users.command("list")
@_json
def users_list(as_json: bool) -> None:
    """Accounts, roles, states, failed unlocks and lockouts."""
    from appliance.vault.accounts import all_accounts

    db, _ = _context()
    found = all_accounts(db)
    if as_json:
        echo_json({"users": [a.to_dict() for a in found]})
        return
    if not found:
        click.echo("no accounts yet: `airlock vault init` creates the first (admin)")
        return
    echo_table([(a.name, a.role, a.state, a.last_unlock_at or "-",
                 f"{a.failed_unlocks} failed" + (f", locked until {a.locked_until}" if a.locked_until else ""))
                for a in found], ["account", "role", "state", "last unlock", "failures"])


@users.command("disable")
@click.argument("name")
def users_disable(name: str) -> None:
    """Destroy the account's key slot: its passphrase opens nothing any more. Others are unaffected."""
    from appliance.access import require
    from appliance.vault.accounts import disable_user

    db, home = _context()
    session = require(db, home, "users.manage")
    disable_user(db, session, name)
    from appliance.vault.agent import agent_status
    from appliance.vault.errors import VaultError

    try:  # this OS user's agent checks the account on every request: a session of `name` ends now
        agent_status(home)
    except VaultError:
        pass
    click.echo(f"account {name} disabled: its key slot is destroyed and its sessions have ended; nobody else's "
               "passphrase changed")
    click.echo("next: `airlock vault rekey`, so that catalog backups taken before now open nothing current")


@users.command("passwd")
@click.argument("name", required=False)
@click.option("--passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Your current passphrase (your own account), or your admin passphrase (resetting NAME's).")
@click.option("--new-passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
              help="The new passphrase, from this file.")
@_kdf_memory
def users_passwd(name: str | None, passphrase_file: Path | None, new_passphrase_file: Path | None,
                 kdf_memory_mib: int | None) -> None:
    """Change your passphrase, or (admin) reset NAME's."""
    from appliance.access import current_session, require
    from appliance.vault.accounts import resolve_name, set_passphrase
    from appliance.vault.cli import _credential, _new_passphrase
    from appliance.vault.keyslots import passphrase_kdf

    db, home = _context()
    session = current_session(home)
    own = name is None or (session is not None and session.account == name)
    if own:
        name = session.account if session is not None else resolve_name(db, name)
    else:
        session = require(db, home, "users.manage")
    credential = _credential(home, passphrase_file, None, False, None)
    new = _new_passphrase(new_passphrase_file, prompt=f"New passphrase for {name}")
    assert name is not None
    set_passphrase(db, credential, name, new, passphrase_kdf(memory_mib=kdf_memory_mib),
                   session=None if own else session)
    click.echo(f"passphrase of {name} changed (its slot only)")


@users.command("emergencies")
@_json
def users_emergencies(as_json: bool) -> None:
    """Break-glass (recovery key) sessions not yet acknowledged by an admin."""
    from appliance.vault.accounts import pending_emergencies

    db, _ = _context()
    found = pending_emergencies(db)
    if as_json:
        echo_json({"emergencies": found})
        return
    if not found:
        click.echo("no unacknowledged emergency access")
        return
    echo_table([(e["id"], e["started_at"], e["origin"]) for e in found], ["id", "started", "from"])


@users.command("ack-emergency")
@click.argument("emergency_id", type=int)
@click.option("--note", required=True, help="Why it happened, for the audit log (no patient data).")
def users_ack_emergency(emergency_id: int, note: str) -> None:
    """Acknowledge a break-glass session after reviewing what it did (`airlock audit show`)."""
    from appliance.access import require
    from appliance.vault.accounts import acknowledge_emergency

    db, home = _context()
    session = require(db, home, "emergency.acknowledge")
    acknowledge_emergency(db, session, emergency_id, note)
    click.echo(f"emergency access #{emergency_id} acknowledged by {session.account}")
