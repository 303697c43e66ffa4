"""`airlock keys create|list|revoke`: API keys for `airlock serve` clients (admins manage them).

    airlock keys create pacs-bridge --task chest-xray   # prints the key once; only its hash is kept
    airlock keys list [--json]
    airlock keys revoke pacs-bridge                      # a running server refuses it at once
"""

from __future__ import annotations

import click

from appliance.cli_output import echo_json, echo_table

_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


@click.group()
def keys() -> None:
    """API keys for clients of the inference server (`airlock serve`)."""


@keys.command("create")
@click.argument("name")
@click.option("--task", "tasks", multiple=True, metavar="TASK",
              help="Limit the key to this model (repeatable); without --task the key may use every model.")
@_json
def keys_create(name: str, tasks: tuple[str, ...], as_json: bool) -> None:
    """Create an API key; it is printed once and only its hash is stored."""
    from appliance.access import require
    from appliance.catalog import open_catalog
    from appliance.paths import airlock_home
    from appliance.serve.api_keys import create_key

    db = open_catalog()
    session = require(db, airlock_home(), "keys.manage")
    found, key = create_key(db, name, list(tasks), actor=session.actor if session else None)
    if as_json:
        echo_json({"key": found.to_dict(), "secret": key})
        return
    scope = ", ".join(found.tasks) if found.tasks else "every model"
    click.echo(f"API key {found.name} created (id {found.key_id}, may use: {scope})")
    click.echo("KEY (shown once; put it in the client's secret store, it cannot be shown again):")
    click.echo("")
    click.echo(f"    {key}")
    click.echo("")
    click.echo("clients send it as the header 'Authorization: Bearer KEY'")


@keys.command("list")
@_json
def keys_list(as_json: bool) -> None:
    """API keys, active first (names, scopes, dates; never the keys)."""
    from appliance.catalog import open_catalog
    from appliance.serve.api_keys import list_keys

    found = list_keys(open_catalog())
    if as_json:
        echo_json({"keys": [k.to_dict() for k in found]})
        return
    if not found:
        click.echo("no API keys; an admin creates one with `airlock keys create NAME`")
        return
    echo_table([(k.name, k.key_id, k.state, k.created_at, ", ".join(k.tasks) or "all") for k in found],
               ["name", "id", "state", "created (UTC)", "tasks"])


@keys.command("revoke")
@click.argument("name")
def keys_revoke(name: str) -> None:
    """Revoke an API key: running servers refuse it from their next request on."""
    from appliance.access import require
    from appliance.catalog import open_catalog
    from appliance.paths import airlock_home
    from appliance.serve.api_keys import revoke_key

    db = open_catalog()
    session = require(db, airlock_home(), "keys.manage")
    found = revoke_key(db, name, actor=session.actor if session else None)
    click.echo(f"API key {found.name} (id {found.key_id}) revoked")
