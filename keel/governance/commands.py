"""CLI: `keel policy …`, `keel reviews …`, `keel audit …`, `keel guards test`.

`keel policy check`, `keel guards test` and `keel audit verify` work offline (a file; the store or a backup read directly);
the others talk to a running Keel.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from keel.core.cliutil import KeyOpt, UrlOpt, client, console, err_console, handle_errors, print_rows
from keel.core.errors import BadRequest
from keel.governance.policy.model import PolicyInvalid, parse_policy

policy_app = typer.Typer(help="Check and test governance policies.", no_args_is_help=True)
reviews_app = typer.Typer(help="The human review queue.", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)
guards_app = typer.Typer(help="Try the guards on a text, offline.", no_args_is_help=True)
ConfigOpt = typer.Option(None, "--config", "-c", envvar="KEEL_CONFIG", help="path to keel.yaml")


def _anchor(value: Optional[str]) -> Optional[tuple[int, str]]:
    from keel.governance.routes import parse_anchor

    return parse_anchor(value)


# -- policy ----------------------------------------------------------------------------------------

@policy_app.command("check")
@handle_errors
def policy_check(file: Path, config: Optional[Path] = ConfigOpt) -> None:
    """Validate a policy file and explain what it does (field and line of every problem)."""
    if not file.is_file():
        raise BadRequest(f"policy file {file} does not exist", fix="pass the path of a policy.yaml")
    try:
        policy = parse_policy(file.read_text(encoding="utf-8"), file.name)
    except PolicyInvalid as exc:
        for e in exc.ids.get("errors", []):
            err_console.print(f"{file}:{e['line']}: {e['field']}: {e['message']}", style="red", markup=False,
                              highlight=False)
        raise
    from keel.governance.policy.engine import PolicyEngine

    engine = PolicyEngine(policy, version=0)
    console.print(f"{file}: valid policy {policy.name!r}", style="bold green", markup=False)
    console.print(f"classifications (low → high): {' < '.join(policy.classifications)}; "
                  f"default {policy.default_classification}", markup=False)
    for rule in policy.data_rules:
        where = ", ".join([f"provider {p}" for p in rule.providers] + rule.deployments) or "no deployment at all"
        console.print(f"rule {rule.name}: {rule.classification} data and above may only go to {where}",
                      markup=False)
    deployments = _configured_deployments(config)
    for level in policy.classifications:
        d = engine.decide(explicit=level)
        g = "; ".join(f"{side}: " + ", ".join(f"{k}={v}" for k, v in acts.items())
                      for side, acts in d.guards.items() if acts) or "none"
        line = f"{level}: guards {g}"
        if deployments:
            ok = [c.deployment_id() for c in engine.allowed(d, deployments)]
            line += f"; may reach {', '.join(ok) or 'no configured deployment'}"
        console.print(line, markup=False)
    for name, uc in policy.use_cases.items():
        d = engine.decide(use_case=name)
        console.print(f"use case {name}: risk {uc.risk}" + (", outputs held for human review" if d.review else ""),
                      markup=False)


def _configured_deployments(config: Optional[Path]) -> list[Any]:
    from keel.core.settings import load_settings
    from keel.gateway.deployments import EMBEDDED

    settings, _ = load_settings(config)
    return (list(EMBEDDED) if settings.embedded_models else []) + list(settings.models)


@policy_app.command("test")
@handle_errors
def policy_test(model: str = typer.Option(..., help="model alias the request names"),
                classification: Optional[str] = typer.Option(None, help="metadata.classification"),
                team: Optional[str] = typer.Option(None, help="team whose default classification applies"),
                collection: list[str] = typer.Option([], help="ID=CLASSIFICATION of a collection used; repeatable"),
                use_case: Optional[str] = typer.Option(None),
                file: Optional[Path] = typer.Option(None, help="test this policy file offline instead of the server's"),
                config: Optional[Path] = ConfigOpt, as_json: bool = typer.Option(False, "--json"),
                url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Would request X be allowed, where could it go, and why."""
    cols = []
    for c in collection:
        cid, sep, cls = c.partition("=")
        if not sep:
            raise BadRequest(f"--collection {c!r} is not ID=CLASSIFICATION", fix="e.g. --collection hr=restricted")
        cols.append({"id": cid, "classification": cls})
    if file is not None:
        from keel.governance.policy.engine import PolicyEngine

        engine = PolicyEngine(parse_policy(file.read_text(encoding="utf-8"), file.name), version=0)
        decision = engine.decide(team=team, explicit=classification, collections=cols, use_case=use_case)
        result = engine.explain(decision, model, [d for d in _configured_deployments(config) if d.alias == model])
    else:
        result = client(url, key).post("/v1/policy/test", {"model": model, "classification": classification,
                                                            "team": team, "collections": cols, "use_case": use_case})
    if as_json:
        print(json.dumps(result, indent=2))
        return
    verdict = "ALLOWED" if result["allowed"] else "DENIED"
    console.print(f"{verdict}: {model} with {result['classification']} data "
                  f"(because: {'; '.join(result['because'])}), policy version {result['policy_version']}",
                  style="bold green" if result["allowed"] else "bold red", markup=False)
    for d in result["deployments"]:
        console.print(f"  {d['deployment']} ({d['provider']}): "
                      + ("allowed" if d["allowed"] else f"denied by rule {d['denied_by']}"), markup=False)
    if result.get("denial"):
        console.print(result["denial"], markup=False)
    console.print(f"risk {result['risk']}; review {'required' if result['review'] else 'not required'}; guards "
                  + json.dumps(result["guards"]), markup=False)
    if not result["allowed"]:
        sys.exit(2)


@policy_app.command("versions")
@handle_errors
def policy_versions(url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Every policy version the store has seen (the active one is marked)."""
    data = client(url, key).get("/admin/policy/versions")
    print_rows(["version", "active", "name", "sha256", "source", "created"],
               [[v["version"], "*" if v["version"] == data["active"] else "", v["name"], v["sha256"][:12],
                 v["source"], v["created_at"]] for v in data["data"]])


# -- reviews ---------------------------------------------------------------------------------------

@reviews_app.command("list")
@handle_errors
def reviews_list(status: str = typer.Option("pending", help="pending, approved, rejected"),
                 url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Your team's review queue."""
    rows = client(url, key).get(f"/v1/reviews?status={status}")["data"]
    print_rows(["id", "status", "model", "use case", "classification", "reasons", "created"],
               [[r["id"], r["status"], r["model"], r["use_case"], r["classification"], "; ".join(r["reasons"]),
                 r["created_at"]] for r in rows])


@reviews_app.command("show")
@handle_errors
def reviews_show(review_id: str, url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """One item: what was asked and what the model answered."""
    print(json.dumps(client(url, key).get(f"/v1/reviews/{review_id}"), indent=2, ensure_ascii=False))


@reviews_app.command("approve")
@handle_errors
def reviews_approve(review_id: str, edit: Optional[str] = typer.Option(None, help="release this text instead"),
                    edit_file: Optional[Path] = typer.Option(None, help="release this file's text instead"),
                    reason: Optional[str] = typer.Option(None), url: Optional[str] = UrlOpt,
                    key: Optional[str] = KeyOpt) -> None:
    """Approve (optionally edit first) and release the answer to the caller."""
    output = edit_file.read_text(encoding="utf-8") if edit_file else edit
    r = client(url, key).post(f"/v1/reviews/{review_id}/approve", {"output": output, "reason": reason})
    console.print(f"approved {r['id']}" + (" (edited)" if output is not None else ""), markup=False)


@reviews_app.command("reject")
@handle_errors
def reviews_reject(review_id: str, reason: str = typer.Option(..., help="shown to the caller"),
                   url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Reject with a reason; the caller never sees the answer."""
    r = client(url, key).post(f"/v1/reviews/{review_id}/reject", {"reason": reason})
    console.print(f"rejected {r['id']}", markup=False)


# -- audit -----------------------------------------------------------------------------------------

@audit_app.command("list")
@handle_errors
def audit_list(action: Optional[str] = typer.Option(None, help="e.g. policy.* or key.create"),
               limit: int = typer.Option(50), url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Recent audit events, newest first."""
    q = f"/v1/audit?limit={limit}" + (f"&action={action}" if action else "")
    print_rows(["seq", "ts", "actor", "action", "team", "details"],
               [[e["seq"], e["ts"], e["actor"], e["action"], e["team_id"], json.dumps(e["details"])]
                for e in client(url, key).get(q)["data"]])


@audit_app.command("export")
@handle_errors
def audit_export(output: Path = typer.Option(..., "-o", "--output", help="JSON-lines file to write"),
                 url: Optional[str] = UrlOpt, key: Optional[str] = KeyOpt) -> None:
    """Download the whole chain (every hashed field, then the head) for offline verification."""
    c = client(url, key)
    import urllib.request

    req = urllib.request.Request(c.url + "/v1/audit/export", headers={"Authorization": f"Bearer {c.key}"})
    with urllib.request.urlopen(req, timeout=c.timeout) as resp, open(output, "wb") as fh:
        while chunk := resp.read(1 << 16):
            fh.write(chunk)
    console.print(f"wrote {output}", markup=False)


@audit_app.command("verify")
@handle_errors
def audit_verify(database_url: Optional[str] = typer.Option(None, help="store to check, e.g. a backup copy"),
                 file: Optional[Path] = typer.Option(None, help="an export (JSON lines) to check instead"),
                 anchor: Optional[str] = typer.Option(None, help="SEQ:HASH recorded earlier, e.g. from a report"),
                 config: Optional[Path] = ConfigOpt) -> None:
    """Check the hash chain, reading the store (or an export) directly: works with the server down."""
    from keel.governance import audit as audit_mod

    if file is not None:
        with open(file, encoding="utf-8") as fh:
            verdict = audit_mod.verify_export(fh, _anchor(anchor))
        where = str(file)
    else:
        import sqlalchemy as sa

        from keel.core.db import Store
        from keel.core.settings import load_settings

        url = database_url or load_settings(config)[0].resolved_database_url()
        store = Store.open(url)
        try:
            verdict = audit_mod.AuditLog(store).verify(_anchor(anchor))
        except sa.exc.SQLAlchemyError as exc:
            raise BadRequest(f"cannot read the audit chain at {url.split('@')[-1]}: {type(exc).__name__}",
                             fix="point --database-url at a Keel store") from None
        finally:
            store.dispose()
        where = url.split("@")[-1]
    if verdict.ok:
        console.print(f"audit chain OK: {verdict.count} events, head {verdict.head_seq}:{verdict.head_hash} ({where})",
                      style="bold green", markup=False, highlight=False)
        return
    err_console.print(f"audit chain BROKEN at event {verdict.broken_seq}: {verdict.reason} "
                      f"({verdict.count} events verified before it; {where})",
                      style="bold red", markup=False, highlight=False)
    sys.exit(1)


# -- guards ----------------------------------------------------------------------------------------

@guards_app.command("test")
@handle_errors
def guards_test(text: str = typer.Argument(..., help="the text to judge; - reads it from stdin"),
                channel: str = typer.Option("direct", help="direct (a user message) or indirect (a retrieved "
                                                           "passage, tool output or document)"),
                policy: Optional[Path] = typer.Option(None, "--policy", help="take thresholds from this policy file"),
                use_case: Optional[str] = typer.Option(None, help="with --policy: that use case's thresholds"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """What the guards make of a text and why: the verdict, the injection score and signals, PII and secrets.
    Exits 2 when the text would be flagged as an injection on the channel."""
    from keel.governance.guards.explain import explain

    if text == "-":
        text = sys.stdin.read()
    thresholds: dict[str, float] = {}
    if policy is not None:
        if not policy.is_file():
            raise BadRequest(f"policy file {policy} does not exist", fix="pass the path of a policy.yaml")
        parsed = parse_policy(policy.read_text(encoding="utf-8"), policy.name)
        thresholds = parsed.injection.thresholds()
        if use_case:
            uc = parsed.use_cases.get(use_case)
            if uc is None:
                raise BadRequest(f"use case {use_case!r} is not in {policy}",
                                 fix=f"use one of: {', '.join(parsed.use_cases) or '(none defined)'}")
            thresholds.update(uc.injection.thresholds() if uc.injection else {})
    result = explain(text, channel, thresholds)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        inj = result["injection"]
        flagged = result["verdict"] == "injection"
        console.print(f"{'INJECTION' if flagged else 'CLEAN'} on the {channel} channel: score {inj['score']} "
                      f"(threshold {result['thresholds'][channel]}); signals: {', '.join(inj['signals']) or 'none'}",
                      style="bold red" if flagged else "bold green", markup=False, highlight=False)
        other = "indirect" if channel == "direct" else "direct"
        console.print(f"  on the {other} channel: {result['verdicts'][other]} "
                      f"(threshold {result['thresholds'][other]})", markup=False, highlight=False)
        for seg in inj["segments"]:
            if seg["score"] >= 0.05 or seg["signals"]:
                why = ", ".join(seg["signals"] + ([f"rule {seg['rule']}"] if seg.get("rule") else [])) or "n-grams"
                console.print(f"  [{seg['start']}:{seg['end']}] score {seg['score']}: {why}", markup=False,
                              highlight=False)
        for name in ("pii", "secrets"):
            found = ", ".join(f"{f['type']} [{f['start']}:{f['end']}]" for f in result[name]) or "none"
            console.print(f"  {name}: {found}", markup=False, highlight=False)
    if result["verdict"] == "injection":
        sys.exit(2)


def mount(app: typer.Typer) -> None:
    app.add_typer(guards_app, name="guards")
    app.add_typer(policy_app, name="policy")
    app.add_typer(reviews_app, name="reviews")
    app.add_typer(audit_app, name="audit")
