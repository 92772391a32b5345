"""CLI: `keel teams …`, `keel users …`, `keel keys …`, `keel secrets …` (talk to a running Keel)."""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import quote

import typer

from keel.core.client import Client
from keel.core.cliutil import KeyOpt, UrlOpt, client, console, handle_errors, print_rows
from keel.core.errors import BadRequest

teams_app = typer.Typer(help="Manage teams.", no_args_is_help=True)
users_app = typer.Typer(help="Manage users.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
secrets_app = typer.Typer(help="Store secrets in the encrypted vault: owner, uses, grants.", no_args_is_help=True)


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


@users_app.command("set-password")
@handle_errors
def users_set_password(user: str = typer.Argument(..., help="the user's id or email"),
                       password: str = typer.Option(..., prompt=True, hide_input=True, confirmation_prompt=True,
                                                    help="12+ characters; prompted when not given"),
                       url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Set a user's console password (admins); the user's open console sessions end."""
    out = client(url, key).request("PUT", f"/admin/users/{quote(user, safe='@')}/password", {"password": password})
    console.print(f"password set for {out['email']}")


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


UseOpt = typer.Option(None, "--use", help="provider, http_header or webhook (repeat for several)")


def _secrets_base(c: Client, team: Optional[str]) -> str:
    """Admins manage every secret under /admin/secrets; anyone else their own team's under /v1/secrets."""
    if c.get("/v1/me")["role"] == "admin":
        return "/admin/secrets"
    if team:
        raise BadRequest("--team is for admins; your secrets belong to your key's team", fix="drop --team")
    return "/v1/secrets"


@secrets_app.command("set")
@handle_errors
def secrets_set(name: str, value: str = typer.Option(..., prompt=True, hide_input=True),
                team: Optional[str] = typer.Option(None, help="owning team (admins; default: global)"),
                use: Optional[list[str]] = UseOpt, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Store a secret (prompted, never echoed); an update keeps its uses unless --use is given."""
    c = client(url, key)
    base = _secrets_base(c, team)
    body: dict[str, Any] = {"value": value, "uses": use or None}
    if base == "/admin/secrets":
        body["team"] = team
    out = c.request("PUT", f"{base}/{name}", body)
    console.print(f"stored {name}\t{out['team_id'] or 'global'}\t{','.join(out['uses'])}", markup=False)


@secrets_app.command("list")
@handle_errors
def secrets_list(url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """List secret names, owners, uses and grants (values are never shown)."""
    c = client(url, key)
    rows = c.get(_secrets_base(c, None))["data"]
    print_rows(["name", "owner", "uses", "grants", "updated"],
               [[s["name"], s["team_id"] or "global", ",".join(s["uses"]),
                 " ".join(f"{g['team_id']}:{g['use']}" for g in s.get("grants", [])), s["updated_at"]] for s in rows])


@secrets_app.command("delete")
@handle_errors
def secrets_delete(name: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Delete a secret (and its grants)."""
    c = client(url, key)
    c.request("DELETE", f"{_secrets_base(c, None)}/{name}")
    console.print(f"deleted {name}")


@secrets_app.command("grant")
@handle_errors
def secrets_grant(name: str, team: str = typer.Option(..., help="team id or name"),
                  use: str = typer.Option(..., help="http_header or webhook"),
                  url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Let a team's workflows use a secret for one of its uses (admins)."""
    client(url, key).request("PUT", f"/admin/secrets/{name}/grants/{team}/{use}")
    console.print(f"granted {name} to {team} for {use}")


@secrets_app.command("revoke")
@handle_errors
def secrets_revoke(name: str, team: str = typer.Option(..., help="team id or name"),
                   use: str = typer.Option(..., help="http_header or webhook"),
                   url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Take a grant back; runs that need it fail from their next step on (admins)."""
    client(url, key).request("DELETE", f"/admin/secrets/{name}/grants/{team}/{use}")
    console.print(f"revoked {name} from {team} for {use}")


def mount(app: typer.Typer) -> None:
    app.add_typer(teams_app, name="teams")
    app.add_typer(users_app, name="users")
    app.add_typer(keys_app, name="keys")
    app.add_typer(secrets_app, name="secrets")
