"""`airlock vault ...`: init, unlock/lock/status, passwd, add-slot, remove-slot, rekey, rotate, verify, delete.

Kept light like appliance.cli: the crypto and catalog modules load inside the commands, so that
`airlock --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli_output import echo_json, echo_table

MIN_PASSPHRASE = 12

_passphrase_file = click.option("--passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
                                help="Read the passphrase from the first line of this file (non-interactive use).")
_recovery_file = click.option("--recovery-key-file", type=click.Path(dir_okay=False, path_type=Path),
                              help="Unlock with the recovery key (from this file) instead of the passphrase.")
_machine = click.option("--machine-key", "use_machine_key", is_flag=True,
                        help="Unlock with the machine key file (unattended jobs; root only).")
_machine_file = click.option("--machine-key-file", type=click.Path(dir_okay=False, path_type=Path),
                             help="The machine key file [default: $AIRLOCK_HOME/vault/machine.key].")
_kdf_memory = click.option("--kdf-memory-mib", type=click.IntRange(min=8, max=4096),
                           help="Argon2id memory for the passphrase slot (default: tuned to ~1 s, 256 MiB-1 GiB).")
_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


@click.group()
def vault() -> None:
    """Encrypted vault for customer data: key slots, key agent, rotation, crypto-shredding."""
    from appliance.vault.keys import disable_core_dumps

    disable_core_dumps()  # every vault command may hold a key


@vault.command("init")
@_passphrase_file
@click.option("--machine-key", "with_machine_key", is_flag=True,
              help="Also create a root-only machine key file so scheduled jobs can unlock unattended (audited).")
@_machine_file
@_kdf_memory
@click.option("--kdf", type=click.Choice(["argon2id", "scrypt"]), help="Passphrase KDF (default: argon2id).")
@click.option("--admin", "admin_name", default="admin", show_default=True,
              help="Name of the first account (role admin); the passphrase is its own.")
def vault_init(passphrase_file: Path | None, with_machine_key: bool, machine_key_file: Path | None,
               kdf_memory_mib: int | None, kdf: str | None, admin_name: str) -> None:
    """Create the vault: root key, the first admin account, recovery key (printed once), optional machine key."""
    from appliance.catalog import open_catalog
    from appliance.paths import ensure_home
    from appliance.vault.keyslots import passphrase_kdf
    from appliance.vault.lifecycle import default_machine_key_path, init_vault

    home = ensure_home()
    passphrase = _new_passphrase(passphrase_file)
    if machine_key_file is not None:
        with_machine_key = True
    key_file = (machine_key_file or default_machine_key_path(home)) if with_machine_key else None
    result = init_vault(open_catalog(), passphrase, passphrase_kdf(memory_mib=kdf_memory_mib, kdf=kdf),
                        machine_key_file=key_file, admin=admin_name)
    click.echo(f"vault {result.vault_id} created with slots: {', '.join(result.slot_ids)}")
    click.echo(f"first account: {admin_name} (admin); add people with `airlock users add NAME --role ...`")
    click.echo(f"passphrase KDF: {_describe_kdf(result.kdf)}")
    if key_file:
        click.echo(f"machine key file (unattended unlock, keep root-only): {key_file}")
    _print_recovery_key(result.recovery_key)
    click.echo("next: `airlock vault unlock`")


@vault.command("unlock")
@_passphrase_file
@_recovery_file
@_machine
@_machine_file
@click.option("--idle-timeout", type=click.IntRange(min=1, max=7 * 24 * 3600), default=900, show_default=True,
              help="Seconds without key use after which the agent wipes the key and exits.")
@click.option("--user", "user", help="Your account (default: your OS user's account, or the only one).")
def vault_unlock(passphrase_file: Path | None, recovery_key_file: Path | None, use_machine_key: bool,
                 machine_key_file: Path | None, idle_timeout: int, user: str | None) -> None:
    """Log in: start the key agent holding the key and who you are, until it locks.

    With the recovery key this is emergency (break-glass) access: admin rights for this session,
    flagged in the audit log until an admin acknowledges it."""
    from appliance.catalog import open_catalog
    from appliance.paths import ensure_home
    from appliance.vault import records
    from appliance.vault.lifecycle import unlock_vault

    home = ensure_home()
    db = open_catalog()
    records.require_initialized(db)  # before prompting for a passphrase
    if not (recovery_key_file or use_machine_key):
        from appliance.vault.accounts import resolve_name

        user = resolve_name(db, user)
    credential = _credential(home, passphrase_file, recovery_key_file, use_machine_key, machine_key_file)
    status = unlock_vault(db, home, credential, idle_timeout, account=user)
    click.echo(f"vault unlocked for {status.account} ({status.role}): the key agent (pid {status.pid}) locks after "
               f"{_duration(status.idle_timeout_s)} idle ({_duration(status.seconds_left)} left)")
    if status.session == "emergency":
        click.echo("EMERGENCY ACCESS: this session is flagged in the audit log until an admin acknowledges it "
                   "(`airlock users emergencies`)", err=True)


@vault.command("lock")
def vault_lock() -> None:
    """Wipe the key from the agent and stop it. Running jobs keep only the data keys they already hold."""
    from appliance.catalog import open_catalog
    from appliance.paths import ensure_home
    from appliance.vault.lifecycle import lock_vault

    locked = lock_vault(open_catalog(), ensure_home())
    click.echo("vault locked" if locked else "vault was already locked")


@vault.command("status")
@_json
def vault_status(as_json: bool) -> None:
    """Locked or unlocked, time left, key slots, KEK version, objects."""
    from appliance.catalog import open_catalog
    from appliance.paths import ensure_home
    from appliance.vault import records
    from appliance.vault.agent import agent_status

    home = ensure_home()
    db = open_catalog()
    vault_id = records.vault_id(db)
    agent = agent_status(home) if vault_id else None
    if agent is not None and agent.vault_id != vault_id:
        agent = None
    from appliance.vault.store import finish_pending_shreds

    # Shreds whose WAL checkpoint a reader blocked complete here once it has let go.
    shreds_pending = finish_pending_shreds(db) if vault_id else []
    # Data objects only: the audit anchor's seal key (kind 'audit') is the vault's own.
    counts = dict(db.execute("SELECT state, COUNT(*) FROM vault_deks WHERE kind != 'audit' GROUP BY state").fetchall())
    kek = db.execute("SELECT MAX(version) FROM vault_keks WHERE state = 'active'").fetchone()[0]
    doc = {
        "initialized": vault_id is not None,
        "vault_id": vault_id,
        "state": "unlocked" if agent else "locked",
        "seconds_left": agent.seconds_left if agent else None,
        "idle_timeout_s": agent.idle_timeout_s if agent else None,
        "agent_pid": agent.pid if agent else None,
        "kek_version": kek,
        "slots": records.slot_summaries(db),
        "objects": {"active": counts.get("active", 0), "deleted": counts.get("shredded", 0)},
        "shreds_pending": shreds_pending,
        "unlock_failures": records.unlock_failures(db)[0],
        "account": agent.account if agent else None,
        "role": agent.role if agent else None,
        "session": agent.session if agent else None,
        "emergencies_pending": _pending_emergencies(db) if vault_id else [],
    }
    if as_json:
        echo_json(doc)
        return
    if vault_id is None:
        click.echo("no vault yet: run `airlock vault init`")
        return
    if agent:
        click.echo(f"vault: unlocked for {agent.account} ({agent.role}), locks in {_duration(agent.seconds_left)} "
                   f"without use (idle timeout {_duration(agent.idle_timeout_s)}, agent pid {agent.pid})")
    else:
        click.echo("vault: locked (run `airlock vault unlock`)")
    for pending in doc["emergencies_pending"]:
        click.echo(f"EMERGENCY ACCESS #{pending['id']} at {pending['started_at']} ({pending['origin']}) is not yet "
                   "acknowledged by an admin (`airlock users ack-emergency ID`)")
    click.echo(f"KEK version: {kek}; objects: {doc['objects']['active']} ({doc['objects']['deleted']} deleted)")
    if shreds_pending:
        from appliance.vault.store import shred_pending_note

        click.echo(shred_pending_note(db))
    if doc["unlock_failures"]:
        click.echo(f"failed unlock attempts since the last success: {doc['unlock_failures']}")
    echo_table([(s["slot_id"], s["kind"], s["created_at"], s["created_by"]) for s in doc["slots"]],
               ["slot", "kind", "created", "by"])


@vault.command("passwd")
@_passphrase_file
@_recovery_file
@click.option("--new-passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Read the new passphrase from this file.")
@_kdf_memory
@click.option("--user", "user", help="With --recovery-key-file: whose passphrase to reset (default: the only account).")
def vault_passwd(passphrase_file: Path | None, recovery_key_file: Path | None, new_passphrase_file: Path | None,
                 kdf_memory_mib: int | None, user: str | None) -> None:
    """Change your passphrase (re-wraps that slot only). Use --recovery-key-file if it was forgotten."""
    from appliance.catalog import open_catalog
    from appliance.paths import ensure_home
    from appliance.vault.keyslots import passphrase_kdf
    from appliance.vault.lifecycle import change_passphrase

    home = ensure_home()
    credential = _credential(home, passphrase_file, recovery_key_file, False, None)
    new = _new_passphrase(new_passphrase_file, prompt="New vault passphrase")
    slot_id = change_passphrase(open_catalog(), credential, new, passphrase_kdf(memory_mib=kdf_memory_mib),
                                account=user)
    click.echo(f"passphrase changed (slot {slot_id}); the data and other slots are unchanged")


@vault.command("add-slot")
@click.option("--kind", type=click.Choice(["passphrase", "recovery", "machine"]), required=True,
              help="What the new slot opens with.")
@_passphrase_file
@_recovery_file
@click.option("--new-passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
              help="For --kind passphrase: read the new slot's passphrase from this file.")
@_machine_file
@_kdf_memory
def vault_add_slot(kind: str, passphrase_file: Path | None, recovery_key_file: Path | None,
                   new_passphrase_file: Path | None, machine_key_file: Path | None,
                   kdf_memory_mib: int | None) -> None:
    """Add a key slot (authenticate with the passphrase or recovery key). Audited."""
    from appliance.catalog import open_catalog
    from appliance.paths import ensure_home
    from appliance.vault.keyslots import passphrase_kdf
    from appliance.vault.lifecycle import add_slot, default_machine_key_path

    home = ensure_home()
    db = open_catalog()
    credential = _credential(home, passphrase_file, recovery_key_file, False, None)
    new_passphrase = _new_passphrase(new_passphrase_file, prompt="New slot passphrase") \
        if kind == "passphrase" else None
    kdf = passphrase_kdf(memory_mib=kdf_memory_mib) if kind == "passphrase" else None
    key_file = (machine_key_file or default_machine_key_path(home)) if kind == "machine" else None
    slot_id, recovery_text = add_slot(db, credential, kind, passphrase=new_passphrase, kdf=kdf,
                                      machine_key_file=key_file)
    click.echo(f"slot {slot_id} added")
    if key_file:
        click.echo(f"machine key file (unattended unlock, keep root-only): {key_file}")
    if recovery_text:
        _print_recovery_key(recovery_text)


@vault.command("remove-slot")
@click.argument("slot_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def vault_remove_slot(slot_id: str, yes: bool) -> None:
    """Destroy a key slot (recovery, machine, or an account's: that disables the account). Admin only.

    The secret opens nothing in the current catalog afterwards; older catalog backups still hold
    the slot: run `airlock vault rekey` so that they open nothing current either."""
    from appliance.access import require
    from appliance.catalog import open_catalog
    from appliance.paths import ensure_home
    from appliance.vault.revocation import remove_slot

    home = ensure_home()
    db = open_catalog()
    session = require(db, home, "vault.remove_slot")
    assert session is not None
    if not yes:
        click.confirm(f"destroy key slot {slot_id} for good?", abort=True)
    what = remove_slot(db, home, session, slot_id)
    click.echo(f"removed {what}; sessions opened with it have ended")
    click.echo("next: `airlock vault rekey`, so that catalog backups taken before now open nothing current")


@vault.command("rekey")
@_passphrase_file
@_machine_file
@_kdf_memory
@click.option("--idle-timeout", type=click.IntRange(min=1, max=7 * 24 * 3600), default=900, show_default=True,
              help="Idle timeout of your session, which continues under the new root key.")
def vault_rekey(passphrase_file: Path | None, machine_key_file: Path | None, kdf_memory_mib: int | None,
                idle_timeout: int) -> None:
    """New root key and KEK, every data key re-wrapped, every slot re-created (admin, own passphrase).

    Old catalog backups and removed or leaked secrets open nothing written from now on. Prints a
    new recovery key and a one-time passphrase per other account, once (ADR 0012)."""
    from appliance.access import require
    from appliance.catalog import open_catalog
    from appliance.paths import ensure_home
    from appliance.vault.keyslots import passphrase_kdf
    from appliance.vault.lifecycle import default_machine_key_path
    from appliance.vault.revocation import rekey

    home = ensure_home()
    db = open_catalog()
    session = require(db, home, "vault.rekey")
    assert session is not None
    credential = _credential(home, passphrase_file, None, False, None)
    result = rekey(db, home, session, credential, passphrase_kdf(memory_mib=kdf_memory_mib),
                   machine_key_file=machine_key_file or default_machine_key_path(home), idle_timeout_s=idle_timeout)
    click.echo(f"vault re-keyed: new root key, KEK version {result.kek_version}, {result.deks_rewrapped} data keys "
               f"re-wrapped; slots: {', '.join(result.slot_ids)}")
    if result.machine_key_file:
        click.echo(f"new machine key file (the old one opens nothing now): {result.machine_key_file}")
    if result.handover:
        click.echo("\nONE-TIME PASSPHRASES (shown once; hand each to its person, who changes it at once with "
                   "`airlock vault unlock --user NAME` and `airlock users passwd`):\n")
        for name, text in sorted(result.handover.items()):
            click.echo(f"    {name}: {text}")
    _print_recovery_key(result.recovery_key)
    click.echo("The old recovery key, machine key and everyone's old passphrase open nothing current.")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


@vault.command("rotate")
def vault_rotate() -> None:
    """New KEK version; every data key re-wrapped under it; data files untouched. Needs an unlocked vault."""
    from appliance.catalog import open_catalog
    from appliance.paths import ensure_home
    from appliance.vault.lifecycle import keys_for, rotate_keks

    db = open_catalog()
    from appliance.access import require

    require(db, ensure_home(), "vault.rotate")
    version, count = rotate_keks(db, keys_for(db, ensure_home()))
    click.echo(f"KEK rotated to version {version}: {count} data keys re-wrapped, older KEK versions destroyed")


@vault.command("verify")
@click.option("--sample", type=click.IntRange(min=1), help="Check only this many files, chosen at random.")
@_json
def vault_verify(sample: int | None, as_json: bool) -> int:
    """Decrypt and authenticate every stored file (or a sample); report each. Exits 1 on any failure."""
    from appliance.access import require
    from appliance.catalog import open_catalog
    from appliance.paths import ensure_home
    from appliance.vault.lifecycle import keys_for
    from appliance.vault.store import verify_files

    home = ensure_home()
    db = open_catalog()
    require(db, home, "vault.verify")
    report = verify_files(db, keys_for(db, home), home, sample=sample)
    if as_json:
        echo_json(report.to_dict())
    else:
        if report.files:
            echo_table([(f.object_id, f.name, "ok" if f.ok else "FAIL", f.bytes if f.ok else f.error)
                        for f in report.files], ["object", "file", "status", "bytes / error"])
        what = f"{report.files_checked} files" + (" (random sample)" if report.sampled else "")
        click.echo(f"\nvault verify: {what}, {report.files_failed} failed")
        if not report.ok:
            click.echo("hint: restore the failed files from a backup; tell your security office", err=True)
    return 0 if report.ok else 1


@vault.command("delete")
@click.argument("object_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def vault_delete(object_id: str, yes: bool) -> None:
    """Crypto-shred an object: destroy its data key, then its files. Irreversible."""
    from appliance.catalog import open_catalog
    from appliance.paths import ensure_home
    from appliance.vault.store import delete_object

    if not yes:
        click.confirm(f"destroy object {object_id} and its key for good?", abort=True)
    from appliance.access import require

    db = open_catalog()
    require(db, ensure_home(), "vault.delete")
    removed = delete_object(db, ensure_home(), object_id)
    from appliance.vault.store import shred_pending_note

    note = shred_pending_note(db)
    if object_id in note:
        click.echo(f"object {object_id}: key destroyed in the catalog, {removed} files removed", err=True)
        click.echo(note, err=True)
        raise SystemExit(3)
    click.echo(f"object {object_id} deleted: key destroyed, {removed} files removed")


def _credential(home: Path, passphrase_file: Path | None, recovery_key_file: Path | None, use_machine_key: bool,
                machine_key_file: Path | None):
    from appliance.vault.lifecycle import Credential, default_machine_key_path

    if sum([passphrase_file is not None, recovery_key_file is not None, use_machine_key]) > 1:
        raise click.UsageError("give one of --passphrase-file, --recovery-key-file, --machine-key")
    if recovery_key_file is not None:
        return Credential.recovery(_read_secret(recovery_key_file))
    if use_machine_key:
        return Credential.machine(machine_key_file or default_machine_key_path(home))
    if passphrase_file is not None:
        return Credential.passphrase(_read_secret(passphrase_file))
    return Credential.passphrase(click.prompt("Vault passphrase", hide_input=True))


def _new_passphrase(path: Path | None, prompt: str = "New vault passphrase") -> str:
    from appliance.vault.errors import VaultError

    text = _read_secret(path) if path else click.prompt(prompt, hide_input=True, confirmation_prompt=True)
    if len(text) < MIN_PASSPHRASE:
        raise VaultError(f"the passphrase is shorter than {MIN_PASSPHRASE} characters",
                         hint="use a longer passphrase, e.g. four or more random words")
    return text


def _read_secret(path: Path) -> str:
    from appliance.vault.errors import VaultError

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VaultError(f"cannot read {path}: {getattr(exc, 'strerror', None) or type(exc).__name__}",
                         hint="check the path and that this account may read it") from None
    first = text.splitlines()[0] if text.strip() else ""
    if not first:
        raise VaultError(f"{path} is empty", hint="put the secret on the first line of the file")
    return first


def _print_recovery_key(text: str) -> None:
    click.echo("\nRECOVERY KEY (shown once; print it and keep it in the site's safe):\n")
    click.echo(f"    {text}\n")
    click.echo("It unlocks the vault and resets the passphrase: `airlock vault passwd --recovery-key-file FILE`.")


def _describe_kdf(kdf: dict) -> str:
    if kdf.get("name") == "argon2id":
        return f"argon2id, {kdf['memory_kib'] // 1024} MiB, {kdf['iterations']} iterations, {kdf['lanes']} lanes"
    return ", ".join(f"{k}={v}" for k, v in sorted(kdf.items()))


def _duration(seconds: int) -> str:
    minutes, secs = divmod(max(0, seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _pending_emergencies(db) -> list[dict]:
    from appliance.vault.accounts import pending_emergencies

    return pending_emergencies(db)
