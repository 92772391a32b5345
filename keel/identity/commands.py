"""CLI: `keel teams …`, `keel users …`, `keel keys …`, `keel secrets …` (talk to a running Keel)."""

from __future__ import annotations

from typing import Optional

import typer
from keel.core.cliutil import KeyOpt, UrlOpt, client, console, handle_errors, print_rows

teams_app = typer.Typer(help="Manage teams.", no_args_is_help=True)
users_app = typer.Typer(help="Manage users.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
secrets_app = typer.Typer(help="Store provider credentials in the encrypted vault.", no_args_is_help=True)


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@teams_app.command("list")
@handle_errors
def teams_list(url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """List teams."""
    print_rows(["id", "name", "classification", "created"],
               [[t["id"], t["name"], t["classification"], t["created_at"]] for t in client(url, key).get("/admin/teams")["data"]])


@teams_app.command("create")
@handle_errors
def teams_create(name: str, classification: str = typer.Option("internal", help="default data classification"),
                 url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Create a team."""
    t = client(url, key).post("/admin/teams", {"name": name, "classification": classification})
    console.print(f"{t['id']}\t{t['name']}")


@teams_app.command("delete")
@handle_errors
def teams_delete(ref: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Delete a team that has no active keys."""
    client(url, key).request("DELETE", f"/admin/teams/{ref}")
    console.print(f"deleted {ref}")


@users_app.command("list")
@handle_errors
def users_list(url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """List users."""
    print_rows(["id", "email", "role", "team"],
               [[u["id"], u["email"], u["role"], u["team_id"]] for u in client(url, key).get("/admin/users")["data"]])


@users_app.command("create")
@handle_errors
def users_create(email: str, role: str = typer.Option("member"), team: Optional[str] = typer.Option(None),
                 url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Create a user."""
    u = client(url, key).post("/admin/users", {"email": email, "role": role, "team": team})
    console.print(f"{u['id']}\t{u['email']}")


@keys_app.command("create")
@handle_errors
def keys_create(name: str = typer.Option("", help="a label"), role: str = typer.Option("member"),
                team: Optional[str] = typer.Option(None), models: Optional[str] = typer.Option(None, help="a,b,…"),
                collections: Optional[str] = typer.Option(None), agents: Optional[str] = typer.Option(None),
                expires_at: Optional[str] = typer.Option(None, help="ISO time"),
                url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Create a key and print it once."""
    body = {"name": name, "role": role, "team": team, "expires_at": expires_at,
            "scopes": {"models": _csv(models), "collections": _csv(collections), "agents": _csv(agents)}}
    k = client(url, key).post("/admin/keys", body)
    console.print(f"{k['id']}\t{k['key']}", markup=False, highlight=False)
    console.print("Store this key now: it is not shown again.", style="yellow")


@keys_app.command("list")
@handle_errors
def keys_list(team: Optional[str] = typer.Option(None), url: Optional[str] = UrlOpt,
              key: Optional[str] = KeyOpt) -> None:
    """List keys (prefixes only)."""
    path = "/admin/keys" + (f"?team={team}" if team else "")
    print_rows(["id", "prefix", "name", "role", "team", "expires", "revoked"],
               [[k["id"], k["prefix"], k["name"], k["role"], k["team_id"], k["expires_at"], k["revoked_at"]]
                for k in client(url, key).get(path)["data"]])


@keys_app.command("revoke")
@handle_errors
def keys_revoke(key_id: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Revoke a key by id or prefix; effective at once."""
    k = client(url, key).post(f"/admin/keys/{key_id}/revoke")
    console.print(f"revoked {k['id']}")


@secrets_app.command("set")
@handle_errors
def secrets_set(name: str, value: str = typer.Option(..., prompt=True, hide_input=True),
                url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Store a secret (prompted, never echoed)."""
    client(url, key).request("PUT", f"/admin/secrets/{name}", {"value": value})
    console.print(f"stored {name}")


@secrets_app.command("list")
@handle_errors
def secrets_list(url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """List secret names (values are never shown)."""
    for s in client(url, key).get("/admin/secrets")["data"]:
        console.print(f"{s['name']}\t{s['updated_at']}")


@secrets_app.command("delete")
@handle_errors
def secrets_delete(name: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Delete a secret."""
    client(url, key).request("DELETE", f"/admin/secrets/{name}")
    console.print(f"deleted {name}")


def mount(app: typer.Typer) -> None:
    app.add_typer(teams_app, name="teams")
    app.add_typer(users_app, name="users")
    app.add_typer(keys_app, name="keys")
    app.add_typer(secrets_app, name="secrets")
